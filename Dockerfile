# Prediction service image: CPU PyTorch + ONNX Runtime, FastAPI/uvicorn, the engine package only.
#   docker build -t plate-detector-serve .
#   docker run --rm -p 8000:8000 -e SERVE_TOKEN=... -v "$PWD/checkpoints/RUN/export:/models:ro" \
#       plate-detector-serve --onnx /models/best-320.onnx
# The model is not in the image: mount the folder holding the .onnx and the .json beside it
# (or build a derived image that COPYs them to /models). See docs/deploy.md.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# CPU wheels of the pinned torch/torchvision (the PyPI default pulls the CUDA build), then what serving imports.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.14.1 torchvision==0.29.1 \
 && pip install "numpy>=1.26" "Pillow>=10.4" "PyYAML>=6.0" "onnxruntime>=1.18" "fastapi>=0.115" \
        "uvicorn>=0.30" "python-multipart>=0.0.9"

RUN useradd --create-home --uid 10001 serve
WORKDIR /app
COPY engine/ engine/
USER serve

EXPOSE 8000
# Bound to all interfaces inside the container, so SERVE_TOKEN must be set (the service refuses to start otherwise).
ENTRYPOINT ["python", "-m", "engine", "serve", "--host", "0.0.0.0", "--port", "8000"]
CMD ["--onnx", "/models/model.onnx"]
