-- The CDC user qsfraud's MySQL source connects as (log-based CDC needs these grants).
CREATE USER IF NOT EXISTS 'qsfraud_cdc'@'%' IDENTIFIED BY 'qsfraud_cdc';
GRANT SELECT, RELOAD, REPLICATION SLAVE, REPLICATION CLIENT ON *.* TO 'qsfraud_cdc'@'%';
FLUSH PRIVILEGES;

-- acme's order table, as qsfraud's demo writes it (device and IP in a JSON column).
CREATE TABLE IF NOT EXISTS shop.orders (
  id VARCHAR(40) PRIMARY KEY, customer_id VARCHAR(64) NOT NULL, card_hash VARCHAR(64) NOT NULL,
  amount DECIMAL(12,2) NOT NULL, currency CHAR(3) NOT NULL, created_at DATETIME(6) NOT NULL,
  channel VARCHAR(8), store_id VARCHAR(32), terminal_id VARCHAR(32), coupon_code VARCHAR(32),
  item_count INT, address_mismatch TINYINT(1), attrs JSON);

-- initech: a second shop with its own database on the same server.
CREATE DATABASE IF NOT EXISTS initech;
GRANT ALL PRIVILEGES ON initech.* TO 'qsfraud_app'@'%';
CREATE TABLE IF NOT EXISTS initech.orders LIKE shop.orders;
