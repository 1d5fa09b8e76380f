"""Byte-identical datasets while the CPUs are busy: two concurrent shard processes, each beside busy loops,
with a prompt cache filled by another history, reproduce a quiet single-process run."""

from __future__ import annotations

import os
import subprocess
import sys

from mdsd3_cli.generate.plan import ShardSpec
from mdsd3_cli.generate.run import plan_run, run_generate
from mdsd3_cli.model.prompts import load_prompt_embeddings
from mdsd3_cli.model.weights import fingerprint_base
from mdsd3_cli.recipe.generate import load_recipe

from .helpers import dataset_files, generate_recipe, manifest_lines, photo_files, write_photos

BUSY_LOOPS = 2


def test_concurrent_shards_under_cpu_load_reproduce_the_quiet_run(tmp_path, monkeypatch):
    photos = write_photos(tmp_path / "photos", photo_files("astronaut", "coffee", "chelsea"))
    settings = "sampling.batch_size=2", "variants.mix.repeats=1"
    monkeypatch.setenv("MDSD3_PROMPT_CACHE", str(tmp_path / "quiet_cache"))
    quiet = load_recipe(generate_recipe(tmp_path / "quiet.yaml", photos, tmp_path / "quiet", *settings))
    run_generate(plan_run(quiet, ShardSpec(0, 1)))

    # Another history: the unconditional prompt was cached alone, before any run needed the others.
    loaded_cache = tmp_path / "loaded_cache"
    load_prompt_embeddings("tiny", fingerprint_base("tiny"), [""], loaded_cache)
    recipe = generate_recipe(tmp_path / "loaded.yaml", photos, tmp_path / "loaded", *settings)
    environment = {**os.environ, "MDSD3_PROMPT_CACHE": str(loaded_cache)}
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(BUSY_LOOPS)]
    try:
        shards = [
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "mdsd3_cli",
                    "generate",
                    "--config",
                    str(recipe),
                    "--shard-index",
                    str(index),
                    "--num-shards",
                    "2",
                ],
                env=environment,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
            for index in range(2)
        ]
        results = [(shard.wait(timeout=600), shard.stderr.read()) for shard in shards]
    finally:
        for loop in busy:
            loop.kill()
            loop.wait()
    assert [code for code, _ in results] == [0, 0], results
    assert dataset_files(tmp_path / "loaded") == dataset_files(tmp_path / "quiet")
    assert sorted(manifest_lines(tmp_path / "loaded")) == sorted(manifest_lines(tmp_path / "quiet"))
