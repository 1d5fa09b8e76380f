"""Shared fixtures: the tiny preset, cached prompt embeddings and real photos from scikit-image."""

from __future__ import annotations

import copy
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

from mdsd3_cli.model.heads import all_prompts  # noqa: E402
from mdsd3_cli.model.prompts import load_prompt_embeddings  # noqa: E402
from mdsd3_cli.model.weights import build_tiny  # noqa: E402

from .helpers import CLASSES  # noqa: E402


@pytest.fixture(scope="session")
def tiny_base():
    """The shared tiny base. build_model takes its modules over (and adds LoRA to them): tests that build
    a model with a LoRA adapter use `fresh_base`."""
    return build_tiny()


@pytest.fixture()
def fresh_base(tiny_base):
    """A private copy of the tiny base (tests that modify weights must not leak into others)."""
    return copy.deepcopy(tiny_base)


@pytest.fixture(scope="session")
def prompt_cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("prompt_cache")


@pytest.fixture(scope="session")
def tiny_prompts(tiny_base, prompt_cache_dir):
    return load_prompt_embeddings("tiny", tiny_base.fingerprint, all_prompts(CLASSES), prompt_cache_dir)


@pytest.fixture(scope="session", autouse=True)
def _private_prompt_cache(tmp_path_factory):
    """Never touch the user's ~/.cache from tests."""
    os.environ["MDSD3_PROMPT_CACHE"] = str(tmp_path_factory.mktemp("user_prompt_cache"))


from .slurm_cluster import slurm_cluster  # noqa: E402,F401  (session fixture)
from .tiny_datasets import folders_dataset, tiny_photos  # noqa: E402,F401  (session fixtures)


@pytest.fixture()
def one_torch_thread():
    """torch on one thread for one test, then as before (the small models' matrices gain nothing from a second
    thread on a busy machine). A test must never set the thread count for the tests after it."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
