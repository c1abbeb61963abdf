# The qsfraud image used by docker-compose.yml for every qsfraud role (worker, CDC, UI).
FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY fraud fraud
COPY pqc pqc
COPY cdc cdc
COPY streams streams
COPY fl fl
COPY ui ui
COPY qsfraud qsfraud
COPY bench bench
COPY examples examples
RUN pip install --no-cache-dir .
ENTRYPOINT ["qsfraud"]
