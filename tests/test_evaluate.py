"""`mdsd3 evaluate`: each estimator against classical degradations with known parameters on real photos, the
statistics on a hand-built dataset with known answers, and the command end to end (tiny-preset output, a
--pairs folder pair, --against with a known shift, bad and empty inputs)."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from rich.console import Console
from scipy import stats
from skimage import data
from skimage.metrics import structural_similarity

from mdsd3_cli.evaluate import (
    CLASS_ESTIMATORS,
    CLASS_SCALES,
    ESTIMATOR_VERSIONS,
    EvaluateError,
    classical,
    evaluate_dataset,
    measure_pair,
    normalised_strengths,
    write_report,
)
from mdsd3_cli.evaluate.aggregate import spearman
from mdsd3_cli.evaluate.estimators import Pair, blur_loss, haze_veil, low_light_stops, noise_sigma, rain_streaks, ssim
from mdsd3_cli.evaluate.report import classes_table
from mdsd3_cli.evaluate.runner import retain_freed_memory

from .helpers import copy_dataset, generate, generate_recipe, mdsd3

SIZE = 128
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")


def photo(name: str, size: int = SIZE) -> np.ndarray:
    """A scikit-image photo, centre-cropped to a square and resized to `size`, as uint8 RGB."""
    pixels = getattr(data, name)()
    image = Image.fromarray(pixels).convert("RGB")
    side = min(image.size)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return np.asarray(image.resize((size, size), Image.Resampling.LANCZOS, box=(left, top, left + side, top + side)))


# ---------------------------------------------------------------- estimators on known parameters


@pytest.mark.parametrize("name", PHOTOS)
def test_noise_sigma_is_recovered_within_15_percent(name: str) -> None:
    clean = photo(name)
    for sigma in (5, 15, 30, 50):
        noisy = classical.gaussian_noise(clean, sigma, seed=sigma)
        estimate = noise_sigma(Pair(clean, noisy))
        assert abs(estimate - sigma) <= 0.15 * sigma, (name, sigma, estimate)


def test_haze_follows_transmission_and_airlight() -> None:
    clean = photo("chelsea")
    by_transmission = [haze_veil(Pair(clean, classical.haze(clean, t, 230.0))) for t in (0.9, 0.7, 0.5, 0.3, 0.1)]
    assert np.all(np.diff(by_transmission) > 0), by_transmission
    by_airlight = [haze_veil(Pair(clean, classical.haze(clean, 0.5, a))) for a in (120, 160, 200, 240)]
    assert np.all(np.diff(by_airlight) > 0), by_airlight
    for t, veil in zip((0.9, 0.7, 0.5, 0.3, 0.1), by_transmission):  # the veil is (1 - t)·A/255 exactly
        assert veil == pytest.approx((1 - t) * 230.0 / 255.0, abs=0.01)


def test_rain_follows_streak_density() -> None:
    for name in ("astronaut", "coffee"):
        clean = photo(name)
        readings = [
            rain_streaks(Pair(clean, classical.rain(clean, density, seed=3))) for density in (0.001, 0.003, 0.01, 0.03)
        ]
        assert np.all(np.diff(readings) > 0), (name, readings)


def test_low_light_reads_stops_and_blur_reads_detail_loss() -> None:
    clean = photo("coffee")
    stops = [low_light_stops(Pair(clean, classical.low_light(clean, exposure))) for exposure in (0.5, 0.25, 0.125)]
    assert stops == pytest.approx([1.0, 2.0, 3.0], abs=0.15)
    blur = [blur_loss(Pair(clean, classical.gaussian_blur(clean, s))) for s in (0.5, 1.0, 2.0)]
    assert np.all(np.diff(blur) > 0) and 0 < blur[0] and blur[-1] <= 1, blur


@pytest.mark.parametrize("name", ("astronaut", "rocket"))
def test_an_unchanged_image_reads_zero_for_every_class(name: str) -> None:
    clean = photo(name)
    measures = measure_pair(clean, clean.copy())
    assert {c: measures[c] for c in CLASS_ESTIMATORS} == {c: 0.0 for c in CLASS_ESTIMATORS}
    assert measures["psnr"] == float("inf") and measures["ssim"] == pytest.approx(1.0)


DEGRADATIONS = {
    "noise": lambda x: classical.gaussian_noise(x, 25, seed=1),
    "haze": lambda x: classical.haze(x, 0.5),
    "rain": lambda x: classical.rain(x, 0.005, seed=1),
    "low_light": lambda x: classical.low_light(x, 0.3),
    "blur": lambda x: classical.gaussian_blur(x, 1.5),
}


@pytest.mark.parametrize("name", ("astronaut", "chelsea"))
def test_each_classical_degradation_moves_its_own_class_at_least_3x_more(name: str) -> None:
    clean = photo(name)
    for own, degrade in DEGRADATIONS.items():
        strengths = normalised_strengths(measure_pair(clean, degrade(clean)))
        largest_other = max(value for cls, value in strengths.items() if cls != own)
        assert strengths[own] >= 3 * max(largest_other, 0.01), (own, strengths)


# ---------------------------------------------------------------- statistics on a hand-built dataset


def save(pixels: np.ndarray, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path.as_posix()


def build_dataset(root: Path, names=("astronaut", "chelsea", "coffee"), size: int = 64) -> Path:
    """An mdsd3-style output: identity, noise (sigma 40·ratio, two repeats), haze (t = 1 − 0.7·ratio) variants
    at known ratios, written to two shard manifests."""
    lines: dict[str, list[str]] = {"shard-a": [], "shard-b": []}
    for index, name in enumerate(names):
        clean = photo(name, size)
        clean_rel = f"clean/{name}.png"
        save(clean, root / clean_rel)
        samples = [("identity", "identity", 1, {}, clean)]
        for repeat in (1, 2):
            ratio = 0.25 * (index + 1)
            samples.append(
                (
                    "noise",
                    f"noise_r{repeat}",
                    repeat,
                    {"noise": ratio},
                    classical.gaussian_noise(clean, 40 * ratio, seed=10 * index + repeat),
                )
            )
        haze_ratio = [0.2, 0.5, 0.9][index]
        samples.append(("haze", "haze", 1, {"haze": haze_ratio}, classical.haze(clean, 1 - 0.7 * haze_ratio)))
        for variant, folder, repeat, ratios, pixels in samples:
            degraded_rel = f"degraded/{folder}/{name}.png"
            save(pixels, root / degraded_rel)
            record = {
                "key": name,
                "variant": variant,
                "folder": folder,
                "repeat": repeat,
                "clean": clean_rel,
                "degraded": degraded_rel,
                "ratios": {"noise": 0.0, "haze": 0.0, **ratios},
            }
            lines["shard-a" if index % 2 == 0 else "shard-b"].append(json.dumps(record))
    (root / "manifest").mkdir()
    for shard, shard_lines in lines.items():
        (root / "manifest" / f"{shard}.jsonl").write_text("".join(line + "\n" for line in shard_lines))
    return root


def test_spearman_of_a_known_ranking() -> None:
    assert spearman(np.array([1.0, 2, 3, 4]), np.array([1.0, 3, 2, 4])) == pytest.approx(0.8)
    assert spearman(np.array([1.0, 1, 1]), np.array([1.0, 2, 3])) is None


def test_monotonicity_selectivity_and_diversity_on_a_hand_built_dataset(tmp_path: Path) -> None:
    report = evaluate_dataset(build_dataset(tmp_path / "set"), workers=1)
    summary = report.summary
    assert summary["samples"] == 3 * 4 and not report.problems
    rows = report.samples()
    for cls in ("noise", "haze"):  # single class: that class's variant and the identity (ratio 0)
        alone = [r for r in rows if r["variant"] in (cls, "identity")]
        expected = stats.spearmanr([r[f"ratio:{cls}"] for r in alone], [r[cls] for r in alone]).statistic
        assert summary["monotonicity"][cls]["spearman_single_class"] == pytest.approx(expected)
        assert expected > 0.95  # ties among repeats keep it just below 1
    for variant, own in (("noise", "noise"), ("haze", "haze")):
        chosen = summary["selectivity"][variant]
        assert chosen["class"] == own and chosen["baseline"] == "identity variants"
        # recompute the moves from the per-sample rows: median normalised strength minus the identity's
        for cls in CLASS_ESTIMATORS:
            mine = np.median([r[f"{cls}_norm"] for r in rows if r["variant"] == variant])
            base = np.median([r[f"{cls}_norm"] for r in rows if r["variant"] == "identity"])
            assert chosen["moves"][cls] == pytest.approx(mine - base)
        other = max(max(v for c, v in chosen["moves"].items() if c != own), 0.0)
        assert chosen["ratio"] == pytest.approx(chosen["moves"][own] / max(other, 0.01))
        assert chosen["ratio"] >= 3
    noise = report.variant("noise")
    assert noise["samples"] == 6 and noise["diversity"]["groups"] == 3
    # two independent noise fields of std s differ by 2s/sqrt(pi) on average; s = 10, 20, 30
    assert noise["diversity"]["median"] == pytest.approx(2 * 20 / np.sqrt(np.pi), rel=0.1)
    assert report.variant("identity")["diversity"] is None
    assert report.variant("noise")["measures"]["noise"]["median"] == pytest.approx(20, rel=0.15)


def test_selectivity_counts_only_rises_of_other_classes(tmp_path: Path) -> None:
    """The demo's case: the identity variant loses fine detail (reads as blur) and the haze variant keeps it, so
    blur falls by far more than haze rises; a fall is not blur appearing and must not lower haze's selectivity."""
    root = tmp_path / "set"
    lines = []
    for name in ("astronaut", "chelsea", "coffee"):
        clean = photo(name, 64)
        save(clean, root / "clean" / f"{name}.png")
        for variant, pixels, ratio in (
            ("identity", classical.gaussian_blur(clean, 1.5), 0.0),
            ("haze", classical.haze(clean, 0.8), 0.5),
        ):
            save(pixels, root / "degraded" / variant / f"{name}.png")
            lines.append(
                json.dumps(
                    {
                        "key": name,
                        "variant": variant,
                        "folder": variant,
                        "repeat": 1,
                        "clean": f"clean/{name}.png",
                        "degraded": f"degraded/{variant}/{name}.png",
                        "ratios": {"haze": ratio},
                    }
                )
            )
    (root / "manifest").mkdir()
    (root / "manifest" / "shard-a.jsonl").write_text("".join(line + "\n" for line in lines))
    report = evaluate_dataset(root, workers=1)
    chosen = report.summary["selectivity"]["haze"]
    moves = chosen["moves"]
    assert moves["blur"] < -3 * moves["haze"] < 0  # blur falls more than haze rises
    rises = [v for c, v in moves.items() if c != "haze" and v > 0]
    assert chosen["largest_other_class"] != "blur" and chosen["largest_other_rise"] == max(rises, default=0.0)
    assert chosen["ratio"] == pytest.approx(moves["haze"] / max(chosen["largest_other_rise"], 0.01))
    assert chosen["ratio"] >= 5
    write_report(report, tmp_path / "report")
    saved = json.loads((tmp_path / "report" / "report.json").read_text())
    assert saved["dataset"]["selectivity"]["haze"]["largest_other_rise"] == chosen["largest_other_rise"]
    terminal = Console(width=200, record=True)
    terminal.print(classes_table(report.summary))
    shown = " ".join(terminal.export_text().split())  # the caption wraps to the table's width
    assert "largest other rise" in shown and "a class reading lower than on the identity is not counted" in shown


# ---------------------------------------------------------------- the command end to end


def write_pairs(root: Path, sigma: float, names=("astronaut", "chelsea", "coffee", "rocket")) -> Path:
    for index, name in enumerate(names):
        clean = photo(name, 64)
        save(clean, root / "clean" / f"{name}.png")
        save(classical.gaussian_noise(clean, sigma, seed=index), root / "degraded" / f"{name}.png")
    return root


def test_pairs_folders_with_bad_files_and_a_shifted_against_set(tmp_path: Path) -> None:
    ten, twenty = write_pairs(tmp_path / "ten", 10), write_pairs(tmp_path / "twenty", 20)
    (ten / "degraded" / "orphan.png").write_bytes((ten / "degraded" / "rocket.png").read_bytes())
    (ten / "clean" / "broken.png").write_bytes(b"not a png")
    (ten / "degraded" / "broken.png").write_bytes((ten / "degraded" / "rocket.png").read_bytes())
    out = tmp_path / "report"
    result = mdsd3(
        "evaluate",
        "--pairs",
        str(ten / "clean"),
        str(ten / "degraded"),
        "--against",
        str(twenty),
        "--out",
        str(out),
        "--workers",
        "2",
    )
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["estimators"] == ESTIMATOR_VERSIONS
    assert report["dataset"]["samples"] == 4 and report["against"][0]["samples"] == 4
    reasons = {Path(problem["path"]).name: problem["reason"] for problem in report["problems"]}
    assert set(reasons) == {"orphan.png", "broken.png"}
    assert "no clean image" in reasons["orphan.png"] and "not an image" in reasons["broken.png"]
    noise = report["distances"]["twenty"]["noise"]
    assert noise["median_shift"] == pytest.approx(10, abs=1.5) and noise["wasserstein"] == pytest.approx(10, abs=1.5)
    assert report["distances"]["twenty"]["psnr"]["median_shift"] < -4  # twice the noise: about 6 dB lower PSNR
    csv_lines = (out / "samples.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + 8 and csv_lines[0].startswith("set,key,variant")
    for plot in ("normalised_by_variant.png", "against_twenty.png"):
        assert Image.open(out / plot).size[0] > 100
    assert "broken.png" in result.output


def test_empty_or_missing_datasets_are_one_line_errors(tmp_path: Path) -> None:
    (tmp_path / "empty" / "manifest").mkdir(parents=True)
    result = mdsd3("evaluate", "--dataset", str(tmp_path / "empty"), "--out", str(tmp_path / "r"))
    assert result.exit_code == 2 and "no pairs to evaluate" in result.output and "Traceback" not in result.output
    result = mdsd3("evaluate", "--dataset", str(tmp_path / "nowhere"))
    assert result.exit_code == 2 and "not a folder" in result.output
    result = mdsd3("evaluate")
    assert result.exit_code == 2 and "exactly one of" in result.output
    with pytest.raises(EvaluateError, match="none of its 1 pairs could be read"):
        root = tmp_path / "unreadable"
        save(photo("astronaut", 32), root / "clean" / "a.png")
        (root / "degraded").mkdir()
        (root / "degraded" / "a.png").write_bytes(b"\x89PNG truncated")
        evaluate_dataset(root, workers=1)


def test_tiny_preset_output_in_two_shards_with_a_partial_run(folders_dataset: Path, tmp_path: Path) -> None:
    out = copy_dataset(folders_dataset, tmp_path / "out")
    (manifest,) = (out / "manifest").glob("*.jsonl")
    lines = manifest.read_bytes().splitlines(keepends=True)
    manifest.unlink()  # the same records, as two shards' manifests, the second one cut by a killed run
    (out / "manifest" / "shard-a.jsonl").write_bytes(b"".join(lines[:4]))
    (out / "manifest" / "shard-b.jsonl").write_bytes(b"".join(lines[4:]) + b'{"key": "half-written')
    missing = next(record["degraded"] for record in map(json.loads, lines) if record["folder"] == "rain")
    (out / missing).unlink()
    report = evaluate_dataset(out, workers=1)
    write_report(report, tmp_path / "report")
    assert report.summary["samples"] == 3 * 3 - 1
    assert set(report.summary["variants"]) == {"rain", "mix"}
    assert report.variant("mix")["samples"] == 6 and report.variant("mix")["diversity"]["groups"] == 3
    assert report.summary["classes"] == ["rain", "haze", "noise"]  # run.json's order
    assert report.summary["monotonicity"]["haze"]["samples"] == 8
    reasons = {Path(problem.path.split(":")[0]).name: problem.reason for problem in report.problems}
    assert reasons == {Path(missing).name: "file not found", "shard-b.jsonl": reasons["shard-b.jsonl"]}
    assert reasons["shard-b.jsonl"].startswith("unfinished last line")
    written = json.loads((tmp_path / "report" / "report.json").read_text())
    assert written["classes"]["noise"]["scale"] == CLASS_SCALES["noise"]
    assert (tmp_path / "report" / "strength_vs_ratio.png").is_file()


def test_webdataset_layout_measures_the_same_pairs(folders_dataset: Path, tiny_photos: Path, tmp_path: Path) -> None:
    recipe = generate_recipe(tmp_path / "recipe.yaml", tiny_photos, tmp_path / "wds", "output.layout=webdataset")
    generate(recipe)
    assert not (tmp_path / "wds" / "degraded").exists() and list((tmp_path / "wds" / "tars").iterdir())
    in_folders, in_tars = (
        evaluate_dataset(dataset, workers=1).samples() for dataset in (folders_dataset, tmp_path / "wds")
    )
    assert len(in_tars) == 9 and in_tars == in_folders  # same bytes, same numbers


@pytest.mark.parametrize("name", ("astronaut", "coffee"))
def test_ssim_equals_scikit_image(name: str) -> None:
    clean = photo(name)
    for degraded in (classical.gaussian_noise(clean, 20, seed=2), classical.haze(clean, 0.4), clean):
        pair = Pair(clean, degraded)
        reference = structural_similarity(
            pair.clean_luma.astype(np.float64), pair.degraded_luma.astype(np.float64), data_range=255.0
        )
        assert ssim(pair) == pytest.approx(reference, abs=1e-5)


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_measuring_processes_keep_freed_memory_on_glibc() -> None:
    assert retain_freed_memory() is True


def test_evaluate_command_does_not_load_the_model_libraries(tmp_path: Path) -> None:
    """evaluate needs no model: loading torch and diffusers doubled its time on 600 pairs and tripled its memory."""
    pairs = write_pairs(tmp_path / "pairs", 10, names=("astronaut", "chelsea"))
    script = (
        "import sys\nfrom typer.testing import CliRunner\nfrom mdsd3_cli.cli import app\n"
        f"result = CliRunner().invoke(app, ['evaluate', '--dataset', {str(pairs)!r}, '--out', "
        f"{str(tmp_path / 'report')!r}, '--workers', '1'])\n"
        "assert result.exit_code == 0, result.output\n"
        "print(sorted(name for name in ('torch', 'diffusers', 'transformers') if name in sys.modules))\n"
    )
    finished = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr
    assert finished.stdout.strip().splitlines()[-1] == "[]"
