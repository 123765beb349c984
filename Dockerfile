# One image for every kontext-queue process; compose.yaml picks the command.
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md constraints.txt ./
COPY kq ./kq
COPY worker ./worker
COPY webhook_receiver ./webhook_receiver
COPY wavespeed_sim ./wavespeed_sim
COPY producer_api ./producer_api
COPY ops_dashboard ./ops_dashboard
RUN pip install -c constraints.txt . && useradd --create-home kq
USER kq
ENTRYPOINT ["kq"]
