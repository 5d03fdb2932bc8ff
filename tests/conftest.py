"""Session fixtures: the built-in tiny models, built once into a private cache."""

from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def private_model_cache(tmp_path_factory):
    """Tiny models are built once per test session into a folder no other run shares."""
    if "SDXL_PERSONALIZE_CACHE" not in os.environ:
        os.environ["SDXL_PERSONALIZE_CACHE"] = str(tmp_path_factory.mktemp("model-cache"))
    os.environ["HF_HUB_OFFLINE"] = "1"
    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def tiny_sdxl_path(private_model_cache) -> str:
    from common.builtin_models import builtin_model_path

    return str(builtin_model_path("tiny-sdxl"))


@pytest.fixture(scope="session")
def tiny_edm_path(private_model_cache) -> str:
    from common.builtin_models import builtin_model_path

    return str(builtin_model_path("tiny-edm"))
