"""On a CUDA machine: the service picks the CUDA provider and the fp16 model by itself, and classifies."""

from __future__ import annotations

import io

import pytest
import requests
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import start_server

pytestmark = [pytest.mark.gpu, pytest.mark.slow, pytest.mark.integration]


def test_auto_device_serves_fp16_on_cuda(tiny_model, tmp_path):
    srv = start_server(".", {"IMGCLS_MODEL": tiny_model, "IMGCLS_DEVICE": "auto"}, tmp_path)
    try:
        buf = io.BytesIO()
        Image.new("RGB", (500, 375), (30, 160, 90)).save(buf, "JPEG")
        files = [("images", (f"{i}.jpg", buf.getvalue(), "image/jpeg")) for i in range(13)]  # not a power of two
        resp = requests.post(srv.url + "/classify_batch", files=files, timeout=120)
        assert resp.status_code == 200, resp.text
        assert len(resp.json()["results"]) == 13 and all("label" in r for r in resp.json()["results"])
        text = requests.get(srv.url + "/metrics", timeout=10).text
    finally:
        srv.stop()
    info = [
        s.labels
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "imgcls_model_info" and s.value == 1
    ]
    assert info and info[0]["provider"] == "CUDAExecutionProvider" and info[0]["variant"] == "fp16", info
    assert "CUDAExecutionProvider" in srv.output()
