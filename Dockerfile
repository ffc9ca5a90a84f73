# keras-alexnet images. Two targets:
#
#   training: trains on a GPU and exports models/alexnet/<N>/ (mount runs/ and models/)
#     docker build --target training -t keras-alexnet-train .
#     docker run --gpus all -v "$PWD/runs:/opt/keras-alexnet/runs" \
#       -v "$PWD/models:/opt/keras-alexnet/models" keras-alexnet-train --preset demo
#
#   serving (default): TensorFlow Serving with the exported versions baked in
#     docker build --target serving -t keras-alexnet-serving .
#     docker run -p 8500:8500 -p 8501:8501 keras-alexnet-serving
#   Prometheus metrics: GET http://localhost:8501/monitoring/prometheus/metrics; health:
#   `docker inspect --format '{{json .State.Health}}' <container>` (docs/deploy.md).
#
# tensorflow/serving is pinned to the tensorflow-serving-api version the client uses; move
# both pins together.

FROM tensorflow/tensorflow:2.21.0-gpu AS training
ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN groupadd --gid 10001 alexnet \
    && useradd --uid 10001 --gid alexnet --create-home --shell /bin/bash alexnet
WORKDIR /opt/keras-alexnet
# The dependencies are installed from setup.cfg alone, before the sources are copied, so
# a code edit rebuilds only the layers from the first source COPY on; the dependency
# layer is rebuilt only when pyproject.toml, setup.cfg or README.md change.
COPY pyproject.toml setup.cfg README.md ./
RUN python -c "import configparser; c = configparser.ConfigParser(); c.read('setup.cfg'); \
print(c['options']['install_requires'].strip())" > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt
COPY keras_alexnet ./keras_alexnet
COPY training ./training
COPY serving ./serving
RUN pip install --no-cache-dir --no-deps . \
    && mkdir -p runs models \
    && chown alexnet:alexnet runs models
USER 10001:10001
VOLUME ["/opt/keras-alexnet/runs", "/opt/keras-alexnet/models"]
ENTRYPOINT ["python", "training/train.py"]

FROM tensorflow/serving:2.21.0 AS serving
# The base image's entrypoint runs
#   tensorflow_model_server --port=8500 --rest_api_port=8501 \
#     --model_name=${MODEL_NAME} --model_base_path=${MODEL_BASE_PATH}/${MODEL_NAME} "$@"
# so CMD only appends flags; --model_config_file takes precedence over the name/path pair.
RUN groupadd --system --gid 10001 serving \
    && useradd --system --uid 10001 --gid serving --no-create-home --shell /usr/sbin/nologin serving
COPY serving/models.config serving/batching.config serving/monitoring.config /config/
# The image has no curl or wget: the check is a bash script (GET /v1/models/alexnet on the
# REST port, healthy once a version is AVAILABLE). The start period covers the initial load
# and warm-up, during which TF Serving keeps its ports closed.
COPY --chmod=0555 deploy/healthcheck.sh /usr/local/bin/alexnet-healthcheck
HEALTHCHECK --interval=10s --timeout=5s --start-period=300s --retries=3 \
    CMD ["/usr/local/bin/alexnet-healthcheck"]
# Root-owned and group-readable by the serving user (exports are 0755/0644 since issue 8;
# older ones were 0700, which uid 10001 could not read): readable, never writable by it.
COPY --chown=root:10001 --chmod=0750 models/alexnet /models/alexnet
ENV MODEL_NAME=alexnet \
    MODEL_BASE_PATH=/models
USER 10001:10001
EXPOSE 8500 8501
CMD ["--model_config_file=/config/models.config", \
     "--enable_batching", \
     "--batching_parameters_file=/config/batching.config", \
     "--monitoring_config_file=/config/monitoring.config", \
     "--enable_grpc_healthcheck_service"]
