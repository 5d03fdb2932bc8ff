"""mjhq_fid.py and its engine common/fid.py: FID equal to clean-fid's per category and overall, the Fréchet
distance and KID against independent evaluations, CLIP score from folders and zips, the feature cache,
resumable sharded generation, reports and one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from fid_helpers import CATEGORIES, images_in, small_features, write_fake_inception, write_mjhq_fixture, write_tiny_clip
from helpers import free_port, run_cli
from PIL import Image

import mjhq_fid
from common import fid
from common.cli import UserError

REPO = Path(__file__).resolve().parents[1]
SMALL = fid.FeatureExtractor("small-features", "clean", small_features, torch.device("cpu"))


@pytest.fixture()
def fixture(tmp_path):
    write_mjhq_fixture(tmp_path)
    return tmp_path


def score_config(root: Path, **changes) -> fid.ScoreConfig:
    options = dict(meta_data=root / "meta_data.json", gen_dir=root / "gen", ref=root / "ref", report_dir=root / "report",
                   cache_dir=root / "cache", device="cpu", batch_size=8, num_workers=0)
    return fid.ScoreConfig(**{**options, **changes})


def fids(scores: dict) -> dict[str, float]:
    return {row["category"]: row["fid"] for row in scores["results"]}


# ---------------------------------------------------------------- the numbers

def test_every_category_and_the_overall_fid_equal_clean_fids_compute_fid(fixture):
    from cleanfid.fid import compute_fid

    ours = fids(fid.score(score_config(fixture), extractor=SMALL))
    assert set(ours) == {*CATEGORIES, "overall"}
    for category in [*CATEGORIES, "overall"]:
        sub = "" if category == "overall" else category
        reference = compute_fid(str(fixture / "gen" / sub), str(fixture / "ref" / sub), mode="clean", num_workers=0,
                                batch_size=8, device=torch.device("cpu"), custom_feat_extractor=small_features, verbose=False)
        assert ours[category] == pytest.approx(reference, rel=1e-6), (category, ours[category], reference)
    assert len(set(ours.values())) == 4, "the categories differ, so their FIDs do"


def test_the_reference_zip_gives_the_fids_of_the_extracted_folder(fixture):
    with zipfile.ZipFile(fixture / "mjhq30k_imgs.zip", "w") as archive:
        for path in sorted((fixture / "ref").rglob("*.jpg")):
            archive.write(path, f"mjhq30k_imgs/{path.relative_to(fixture / 'ref')}")
    from_folder = fids(fid.score(score_config(fixture), extractor=SMALL))
    from_zip = fids(fid.score(score_config(fixture, ref=fixture / "mjhq30k_imgs.zip"), extractor=SMALL))
    assert from_zip == pytest.approx(from_folder, rel=1e-6)


def test_frechet_distance_equals_a_float64_scipy_reference():
    from scipy import linalg

    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((200, 32)), rng.standard_normal((150, 32)) @ rng.standard_normal((32, 32)) / 4 + 0.3
    mu1, sigma1, mu2, sigma2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(sigma1 @ sigma2).real
    reference = np.sum((mu1 - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean)
    assert fid.frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(reference, rel=1e-10)
    assert fid.frechet_distance(mu1, sigma1, mu1, sigma1) == pytest.approx(0, abs=1e-9)


def test_where_clean_fids_sqrtm_fails_with_few_images_the_distance_still_equals_its_sample_space_form():
    """Three images with 32 features (like --per_category 3 with Inception's 2048): the covariances are
    singular. Ours equals tr((S1 S2)^1/2) computed as the nuclear norm of X1 X2^T / sqrt((n1-1)(n2-1)) from
    the centred features X, which shares no step with it. clean-fid 0.1.35's scipy sqrtm is at the edge of
    failing here: on some machines (BLAS-dependent) it raises "Imaginary component", elsewhere it agrees."""
    from cleanfid.fid import frechet_distance as cleanfid_frechet_distance

    rng = np.random.default_rng(33)
    a = rng.standard_normal((3, 32)).astype(np.float32)
    b = (rng.standard_normal((3, 32)) * rng.random(32) * 1e3).astype(np.float32)
    mu1, sigma1, mu2, sigma2 = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    x1, x2 = (a - a.mean(0)).astype(np.float64), (b - b.mean(0)).astype(np.float64)
    trace_sqrt = np.linalg.svd(x1 @ x2.T / np.sqrt(2 * 2), compute_uv=False).sum()
    reference = np.sum((mu1.astype(np.float64) - mu2) ** 2) + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt
    assert fid.frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(reference, rel=1e-9)
    try:
        theirs = cleanfid_frechet_distance(mu1, sigma1, mu2, sigma2)
    except ValueError as error:
        assert "Imaginary component" in str(error)
    else:
        assert theirs == pytest.approx(reference, rel=1e-6)


def test_kid_with_whole_sets_equals_the_unbiased_mmd_of_the_cubic_kernel_and_leaves_numpys_state_alone():
    """With as many images as the subset size, every subset is the whole set, so clean-fid's average over
    subsets is the unbiased MMD^2 of k(x, y) = (x.y / d + 1)^3 over all pairs (Bińkowski et al. 2018, eq. 4)."""
    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((40, 8)), rng.standard_normal((40, 8)) + 0.2
    kernel = lambda p, q: (p @ q.T / 8 + 1) ** 3  # noqa: E731
    m = 40
    kxx, kyy, kxy = kernel(x, x), kernel(y, y), kernel(x, y)
    mmd = ((kxx.sum() - np.trace(kxx)) + (kyy.sum() - np.trace(kyy))) / (m * (m - 1)) - 2 * kxy.sum() / m**2
    state = np.random.get_state()
    assert fid.kernel_inception_distance(x, y) == pytest.approx(mmd, rel=1e-9)
    assert np.array_equal(np.random.get_state()[1], state[1])
    assert fid.kernel_inception_distance(x[:1], y) is None


def test_kid_is_reported_per_category_and_reproducible(fixture):
    first = fid.score(score_config(fixture, kid=True), extractor=SMALL)
    second = fid.score(score_config(fixture, kid=True), extractor=SMALL)
    kids = [row["kid"] for row in first["results"]]
    assert all(isinstance(k, float) for k in kids) and kids == [row["kid"] for row in second["results"]]


def test_clip_score_is_100_times_the_clamped_cosine_of_each_image_and_its_prompt(fixture, tiny_sdxl_path):
    from transformers import CLIPModel

    clip_dir = fixture / "clip"
    processor = write_tiny_clip(clip_dir, Path(tiny_sdxl_path) / "tokenizer")
    scores = fid.score(score_config(fixture, clip_model=str(clip_dir)), extractor=SMALL)

    model = CLIPModel.from_pretrained(clip_dir).eval()
    meta = json.loads((fixture / "meta_data.json").read_text())
    for row in scores["results"]:
        files = sorted((fixture / "gen").rglob("*.png")) if row["category"] == "overall" else sorted((fixture / "gen" / row["category"]).glob("*.png"))
        inputs = processor(text=[meta[p.stem]["prompt"] for p in files], images=[Image.open(p).convert("RGB") for p in files],
                           return_tensors="pt", padding=True)
        with torch.no_grad():
            image = model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output.double()
            text = model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).pooler_output.double()
        cosine = (image / image.norm(dim=-1, keepdim=True) * text / text.norm(dim=-1, keepdim=True)).sum(-1)
        expected = float((100 * cosine.clamp(min=0)).mean())
        assert row["clip_score"] == pytest.approx(expected, rel=1e-5), row["category"]


def test_clip_scores_from_a_zipped_gen_dir_equal_those_from_the_extracted_folder(fixture, tiny_sdxl_path):
    clip_dir = fixture / "clip"
    write_tiny_clip(clip_dir, Path(tiny_sdxl_path) / "tokenizer")
    with zipfile.ZipFile(fixture / "gen.zip", "w") as archive:
        for path in sorted((fixture / "gen").rglob("*.png")):
            archive.write(path, f"gen/{path.relative_to(fixture / 'gen')}")
    clip_scores = lambda scores: {row["category"]: row["clip_score"] for row in scores["results"]}  # noqa: E731
    from_folder = fid.score(score_config(fixture, clip_model=str(clip_dir)), extractor=SMALL)
    from_zip = fid.score(score_config(fixture, gen_dir=fixture / "gen.zip", clip_model=str(clip_dir), report_dir=fixture / "zip-report"),
                         extractor=SMALL)
    assert from_zip["ids"]["generated"] == images_in(fixture / "gen"), from_zip["ids"]
    assert all(isinstance(value, float) for value in clip_scores(from_folder).values()), clip_scores(from_folder)
    assert clip_scores(from_zip) == clip_scores(from_folder), (clip_scores(from_zip), clip_scores(from_folder))


# ---------------------------------------------------------------- the cache

@pytest.fixture()
def image_reads(monkeypatch):
    """Counts the images the feature pass decodes (the features are computed in-process with num_workers 0)."""
    reads = []
    original = fid.ViewedResizeDataset.__getitem__
    monkeypatch.setattr(fid.ViewedResizeDataset, "__getitem__", lambda self, i: reads.append(self.inner.files[i]) or original(self, i))
    return reads


def test_a_second_run_reads_no_image_and_new_images_are_the_only_ones_read(fixture, image_reads):
    generated, reference = images_in(fixture / "gen"), images_in(fixture / "ref")
    first = fid.score(score_config(fixture), extractor=SMALL)
    assert len(image_reads) == generated + reference, "one pass: each generated and reference image read once for all 4 FIDs"
    image_reads.clear()
    second = fid.score(score_config(fixture), extractor=SMALL)
    assert image_reads == [] and second["features"]["generated"] == {"computed": 0, "cached": generated}
    assert fids(second) == fids(first)

    # two more generated images for ids that have references, and one image changed in place
    rng = np.random.default_rng(5)
    for image_id in ("an009", "an010"):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(fixture / "gen" / "animals" / f"{image_id}.png")
    changed = fixture / "gen" / "food" / "fo000.png"
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(changed)
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    image_reads.clear()
    third = fid.score(score_config(fixture), extractor=SMALL)
    assert sorted(Path(p).name for p in image_reads) == ["an009.png", "an010.png", "fo000.png"]
    assert third["features"]["generated"] == {"computed": 3, "cached": generated + 2 - 3}
    assert fids(third)["people"] == fids(first)["people"] and fids(third)["animals"] != fids(first)["animals"]


def test_only_meta_data_ids_count_and_mismatched_ids_are_reported(fixture):
    never_generated = images_in(fixture / "ref") - images_in(fixture / "gen")
    baseline = fids(fid.score(score_config(fixture), extractor=SMALL))
    Image.new("RGB", (40, 40), "red").save(fixture / "gen" / "animals" / "not_an_mjhq_id.png")
    Image.new("RGB", (40, 40), "red").save(fixture / "ref" / "food" / "another_stranger.jpg")
    meta = json.loads((fixture / "meta_data.json").read_text())
    meta["zz999"] = {"category": "people", "prompt": "no reference for this one"}
    (fixture / "meta_data.json").write_text(json.dumps(meta))
    Image.new("RGB", (40, 40), "blue").save(fixture / "gen" / "people" / "zz999.png")
    scores = fid.score(score_config(fixture), extractor=SMALL)
    assert fids(scores)["animals"] == baseline["animals"] and fids(scores)["food"] == baseline["food"]
    ids = scores["ids"]
    assert ids["generated_not_in_meta_data"] == ["animals/not_an_mjhq_id.png"]
    assert ids["reference_not_in_meta_data"] == 1
    assert ids["generated_without_reference"] == ["zz999"]
    assert ids["reference_without_generated"] == never_generated


# ---------------------------------------------------------------- generation

def write_meta(path: Path, entries: dict) -> Path:
    path.write_text(json.dumps(entries))
    return path


MJHQ_LIKE = {f"{c[:2]}{k}": {"category": c, "prompt": f"a {c} picture, {k}"} for c in CATEGORIES for k in range(3)}


def generate_args(tiny_sdxl_path: str, meta: Path, gen_dir: Path, *extra) -> list[str]:
    return ["generate", "--meta_data", str(meta), "--gen_dir", str(gen_dir), "-m", tiny_sdxl_path,
            "--num_inference_steps", "2", "--seed", "7", *map(str, extra)]


def test_generation_makes_every_id_with_its_own_seed_and_a_rerun_makes_only_what_is_missing(tiny_sdxl_path, tmp_path, capsys):
    from helpers import parse_webui_parameters

    meta = write_meta(tmp_path / "meta_data.json", MJHQ_LIKE)
    gen = tmp_path / "gen"
    code, out, err = run_cli(mjhq_fid.app, generate_args(tiny_sdxl_path, meta, gen, "--batch_size", 1), capsys)
    assert code == 0 and "made 9 image(s)" in out, err
    files = {p.relative_to(gen).as_posix(): p.read_bytes() for p in sorted(gen.rglob("*.png"))}
    assert sorted(files) == sorted(f"{e['category']}/{i}.png" for i, e in MJHQ_LIKE.items())
    parameters = parse_webui_parameters(Image.open(gen / "food" / "fo1.png").text["parameters"])
    assert parameters["prompt"] == "a food picture, 1" and int(parameters["Seed"]) == mjhq_fid.image_seed("fo1", 7)

    (gen / "animals" / "an0.png").unlink()  # as if the run had been killed before it
    truncated = gen / "people" / "pe2.png"
    truncated.write_bytes(files["people/pe2.png"][: len(files["people/pe2.png"]) // 2])
    untouched = {p: p.stat().st_mtime_ns for p in gen.rglob("*.png") if p != truncated}
    code, out, err = run_cli(mjhq_fid.app, generate_args(tiny_sdxl_path, meta, gen, "--batch_size", 1), capsys)
    assert code == 0 and "7 already in" in out and "made 2 image(s)" in out, err
    assert all(p.stat().st_mtime_ns == mtime for p, mtime in untouched.items())
    assert {p.relative_to(gen).as_posix(): p.read_bytes() for p in sorted(gen.rglob("*.png"))} == files


@pytest.mark.heavy
def test_resuming_with_other_settings_is_refused_before_mixing_two_runs(tiny_sdxl_path, tmp_path, capsys):
    meta = write_meta(tmp_path / "meta_data.json", dict(list(MJHQ_LIKE.items())[:3]))
    gen = tmp_path / "gen"
    assert run_cli(mjhq_fid.app, generate_args(tiny_sdxl_path, meta, gen), capsys)[0] == 0
    (gen / "animals" / "an2.png").unlink()
    code, _, err = run_cli(mjhq_fid.app, [*generate_args(tiny_sdxl_path, meta, gen), "--guidance_scale", 3], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "animals/an0.png was made with other settings ('CFG scale: 5.0' there, 'CFG scale: 3.0' now)" in err
    assert not (gen / "animals" / "an2.png").exists()
    code, _, err = run_cli(mjhq_fid.app, generate_args(tiny_sdxl_path, meta, gen), capsys)
    assert code == 0, err
    before = {p: p.read_bytes() for p in gen.rglob("*.png")}
    code, _, err = run_cli(mjhq_fid.app, [*generate_args(tiny_sdxl_path, meta, gen), "--guidance_scale", 3], capsys)
    assert code == 2 and "was made with other settings" in err, "nothing missing is no reason to skip the check"
    assert {p: p.read_bytes() for p in gen.rglob("*.png")} == before


@pytest.mark.heavy
def test_a_killed_generation_resumes_and_makes_only_the_missing_images(tiny_sdxl_path, tmp_path):
    import time

    meta = write_meta(tmp_path / "meta_data.json", MJHQ_LIKE)
    gen = tmp_path / "gen"
    command = [sys.executable, "mjhq_fid.py", *generate_args(tiny_sdxl_path, meta, gen, "--batch_size", 1, "--num_inference_steps", 6)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while len(list(gen.rglob("*.png"))) < 3 and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.kill()
    process.wait()
    before = {p: p.stat().st_mtime_ns for p in gen.rglob("*.png")}
    assert 3 <= len(before) < 9, f"killed after {len(before)} images"
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"{len(before)} already in" in result.stdout and f"made {9 - len(before)} image(s)" in result.stdout
    assert all(p.stat().st_mtime_ns == mtime for p, mtime in before.items())
    assert len(list(gen.rglob("*.png"))) == 9 and not list(gen.rglob("*.partial"))


def test_per_category_picks_the_same_ids_whatever_the_order_of_the_file(tmp_path):
    forward = fid.read_meta_data(write_meta(tmp_path / "a.json", MJHQ_LIKE))
    backward = fid.read_meta_data(write_meta(tmp_path / "b.json", dict(reversed(list(MJHQ_LIKE.items())))))
    chosen = [e.image_id for e in mjhq_fid.select_entries(forward, 2)]
    assert chosen == [e.image_id for e in mjhq_fid.select_entries(backward, 2)]
    assert len(chosen) == 6 and all(sum(i.startswith(c[:2]) for i in chosen) == 2 for c in CATEGORIES)
    assert set(chosen) < {e.image_id for e in mjhq_fid.select_entries(forward, 3)}


@pytest.mark.heavy
def test_two_processes_make_exactly_the_files_of_one(tiny_sdxl_path, tmp_path):
    meta = write_meta(tmp_path / "meta_data.json", MJHQ_LIKE)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}  # same kernels in both runs
    for processes in (1, 2):
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port", str(free_port()),
                   "mjhq_fid.py", *generate_args(tiny_sdxl_path, meta, tmp_path / f"gen{processes}", "--batch_size", 2)]
        result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
    one = {p.relative_to(tmp_path / "gen1"): p.read_bytes() for p in sorted((tmp_path / "gen1").rglob("*.png"))}
    two = {p.relative_to(tmp_path / "gen2"): p.read_bytes() for p in sorted((tmp_path / "gen2").rglob("*.png"))}
    assert len(one) == 9 and one == two
    assert len(set(one.values())) == 9, "every image differs"


def test_a_png_cut_short_or_not_a_png_counts_as_missing(tmp_path):
    good = tmp_path / "good.png"
    Image.new("RGB", (16, 16), "green").save(good)
    data = good.read_bytes()
    (tmp_path / "cut.png").write_bytes(data[:-5])
    (tmp_path / "jpeg.png").write_bytes(b"\xff\xd8\xff" + data[3:])
    (tmp_path / "tiny.png").write_bytes(data[:8])
    assert mjhq_fid.is_complete_png(good)
    assert not any(mjhq_fid.is_complete_png(tmp_path / n) for n in ("cut.png", "jpeg.png", "tiny.png", "absent.png"))


# ---------------------------------------------------------------- command line and reports

@pytest.mark.heavy
def test_all_runs_generation_scoring_and_the_report_through_a_local_inception_file(tiny_sdxl_path, tmp_path, capsys):
    meta = write_meta(tmp_path / "meta_data.json", MJHQ_LIKE)
    rng = np.random.default_rng(0)
    for image_id, entry in MJHQ_LIKE.items():
        path = tmp_path / "ref" / entry["category"] / f"{image_id}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    weights = write_fake_inception(tmp_path / "my-inception.pt")
    report = tmp_path / "report"
    code, out, err = run_cli(mjhq_fid.app, ["all", "--meta_data", meta, "--gen_dir", tmp_path / "gen", "--ref", tmp_path / "ref",
                                            "-m", tiny_sdxl_path, "--num_inference_steps", 2, "--inception_weights", weights,
                                            "--report_dir", report, "--cache_dir", tmp_path / "cache", "--num_workers", 0,
                                            "--kid", "--lora_scale", 1.0], capsys)
    assert code == 0, err
    assert "made 9 image(s)" in out and "generated 9 computed" in out
    document = json.loads((report / "fid_report.json").read_text())
    (run,) = document["runs"]
    assert run["label"] == Path(tiny_sdxl_path).name and run["mode"] == "clean"
    assert [row["category"] for row in run["results"]] == [*CATEGORIES, "overall"]
    assert all(row["fid"] > 0 and row["kid"] is not None for row in run["results"])
    table = (report / "fid_report.md").read_text()
    assert "| category | n | FID | KID |" in table and "| **overall** | 9 |" in table
    with Image.open(report / "fid_report.png") as chart:
        chart.verify()
    assert Image.open(report / "fid_report.png").size[0] > 200

    # a second run of the same model, compared side by side
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**run, "label": "with LoRA", "results": [{**row, "fid": row["fid"] / 2} for row in run["results"]]}))
    code, out, err = run_cli(mjhq_fid.app, ["report", report / "scores.json", other, "--report_dir", tmp_path / "compare"], capsys)
    assert code == 0, err
    table = (tmp_path / "compare" / "fid_report.md").read_text()
    base = Path(tiny_sdxl_path).name
    assert f"| category | n {base} | n with LoRA | FID {base} | FID with LoRA |" in table
    overall = next(line for line in table.splitlines() if line.startswith("| **overall**"))
    assert f"{run['results'][-1]['fid']:.2f} | {run['results'][-1]['fid'] / 2:.2f}" in overall
    assert len(json.loads((tmp_path / "compare" / "fid_report.json").read_text())["runs"]) == 2


def test_without_inception_weights_or_network_the_error_says_what_to_download_and_where(fixture, monkeypatch, capsys):
    import tempfile
    import urllib.request

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    monkeypatch.setattr(tempfile, "gettempdir", lambda: str(fixture))
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(fixture / "hub"))
    monkeypatch.setenv("SDXL_PERSONALIZE_CACHE", str(fixture / "empty-cache"))
    monkeypatch.delenv(fid.INCEPTION_WEIGHTS_ENV, raising=False)
    code, _, err = run_cli(mjhq_fid.app, ["score", "--meta_data", fixture / "meta_data.json", "--gen_dir", fixture / "gen",
                                          "--ref", fixture / "ref"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "inception-2015-12-05.pt" in err and fid.TORCHSCRIPT_INCEPTION[1] in err
    assert "--inception_weights" in err and fid.INCEPTION_WEIGHTS_ENV in err


@pytest.mark.heavy
def test_the_environment_variable_names_the_inception_file(fixture, monkeypatch, capsys):
    monkeypatch.setenv(fid.INCEPTION_WEIGHTS_ENV, str(write_fake_inception(fixture / "fake.pt")))
    code, out, err = run_cli(mjhq_fid.app, ["score", "--meta_data", fixture / "meta_data.json", "--gen_dir", fixture / "gen",
                                            "--ref", fixture / "ref", "--report_dir", fixture / "r", "--cache_dir",
                                            fixture / "cache", "--num_workers", 0], capsys)
    assert code == 0, err
    assert json.loads((fixture / "r" / "scores.json").read_text())["feature_extractor"].startswith("clean-")


@pytest.mark.heavy
def test_a_changed_weights_file_or_mode_does_not_reuse_cached_features(fixture, image_reads):
    """Features are cached under the extractor's identity, its mode and its weights file's digest: other
    weights written to the same path, and another mode, each read every image again."""
    weights = write_fake_inception(fixture / "a.pt")
    first = fid.inception_extractor("clean", weights, "cpu")
    legacy = fid.inception_extractor("legacy_tensorflow", fixture / "a.pt", "cpu")
    assert first.identity != legacy.identity and first.identity.startswith("clean-")
    batch = torch.rand(2, 3, 299, 299) * 255
    assert first.model(batch).shape == (2, 2048)

    generated, reference = images_in(fixture / "gen"), images_in(fixture / "ref")
    original = fid.score(score_config(fixture, inception_weights=weights))
    every_read = sorted(image_reads)
    assert len(every_read) == generated + reference
    image_reads.clear()
    fid.score(score_config(fixture, inception_weights=weights))
    assert image_reads == [], "the same weights and mode: nothing is read again"

    write_fake_inception(weights, seed=1)
    rewritten = fid.score(score_config(fixture, inception_weights=weights))
    assert sorted(image_reads) == every_read, f"other weights at the same path: {len(image_reads)} of {len(every_read)} images read"
    assert rewritten["features"] == {"generated": {"computed": generated, "cached": 0}, "reference": {"computed": reference, "cached": 0}}
    assert rewritten["feature_extractor"] != original["feature_extractor"]
    assert all(a != pytest.approx(b, rel=1e-6) for a, b in zip(fids(original).values(), fids(rewritten).values())), (fids(original), fids(rewritten))

    image_reads.clear()
    other_mode = fid.score(score_config(fixture, inception_weights=weights, mode="legacy_tensorflow"))
    assert sorted(image_reads) == every_read, f"another mode: {len(image_reads)} of {len(every_read)} images read"
    assert other_mode["features"]["generated"] == {"computed": generated, "cached": 0}


@pytest.mark.heavy
def test_legacy_tensorflow_mode_resizes_inside_the_network_and_gives_other_numbers(fixture):
    weights = write_fake_inception(fixture / "fake.pt")
    clean = fid.score(score_config(fixture, inception_weights=weights))
    legacy = fid.score(score_config(fixture, inception_weights=weights, mode="legacy_tensorflow", report_dir=fixture / "legacy"))
    assert legacy["feature_extractor"].startswith("legacy_tensorflow-") and clean["feature_extractor"].startswith("clean-")
    assert legacy["features"]["generated"]["computed"] == images_in(fixture / "gen"), "features of another mode are not reused"
    assert all(a != pytest.approx(b, rel=1e-6) for a, b in zip(fids(clean).values(), fids(legacy).values()))


@pytest.mark.filterwarnings("ignore:The parameter 'pretrained'", "ignore:Arguments other than a weight enum")  # building the stand-in
def test_legacy_pytorch_mode_loads_pytorch_fids_weights_from_a_local_file(fixture, monkeypatch):
    """A random-weight file in pytorch-fid's layout stands in for pt_inception-2015-12-05-6726825d.pth."""
    import cleanfid.inception_pytorch as inception_pytorch

    with monkeypatch.context() as patch:  # build the FID Inception without its download, to save its weights
        patch.setattr(inception_pytorch, "load_state_dict_from_url", lambda *args, **kwargs: None)
        patch.setattr(torch.nn.Module, "load_state_dict", lambda self, state, *args, **kwargs: None)
        torch.save(inception_pytorch.fid_inception_v3().state_dict(), fixture / "pt_inception.pth")
    extractor = fid.inception_extractor("legacy_pytorch", fixture / "pt_inception.pth", "cpu")
    images = torch.rand(2, 3, 299, 299) * 255
    features = extractor.model(images)
    assert features.shape == (2, 2048) and extractor.identity.startswith("legacy_pytorch-")
    with pytest.raises(UserError, match="could not be loaded as pt_inception-2015-12-05-6726825d.pth"):
        fid.inception_extractor("legacy_pytorch", write_fake_inception(fixture / "fake.pt"), "cpu")


BAD_INPUTS = {
    "unknown mode": (["--mode", "tensorflow"], "--mode 'tensorflow' is not one of clean, legacy_tensorflow, legacy_pytorch"),
    "missing reference": (["--ref", "{root}/nowhere"], "--ref {root}/nowhere not found"),
    "meta data not json": (["--meta_data", "{root}/gen/animals/an000.png"], "is not UTF-8 text: byte 0x89 at offset 0"),
    "meta data not json either": (["--meta_data", "{root}/gen"], "not found"),
    "weights not a model": (["--inception_weights", "{root}/meta_data.json"], "could not be loaded as inception-2015-12-05.pt"),
    "no images": (["--gen_dir", "{root}/empty"], "holds no image named after a meta_data id"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_gives_one_clear_line(case, fixture, capsys):
    extra, message = BAD_INPUTS[case]
    (fixture / "empty").mkdir()
    options = {"--meta_data": "{root}/meta_data.json", "--gen_dir": "{root}/gen", "--ref": "{root}/ref",
               "--inception_weights": str(write_fake_inception(fixture / "fake.pt")), "--cache_dir": "{root}/cache"}
    options.update(zip(extra[::2], extra[1::2]))
    argv = ["score", *(str(a).format(root=fixture) for pair in options.items() for a in pair)]
    code, _, err = run_cli(mjhq_fid.app, argv, capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert message.format(root=fixture) in err


def test_an_unreadable_reference_image_is_named_and_finished_features_are_kept(fixture, capsys):
    (fixture / "ref" / "people" / "pe005.jpg").write_bytes(b"not an image")
    with pytest.raises(UserError, match="could not be read .*pe005.jpg"):
        fid.score(score_config(fixture), extractor=SMALL)
    kept = sum(len(fid.FeatureCache(folder).rows) for folder in (fixture / "cache" / "small-features" / "features").iterdir())
    assert kept >= images_in(fixture / "gen") + 8, "the generated set's features and the reference batch before the bad image were kept"


def test_image_suffixes_are_clean_fids_less_numpy_arrays():
    from cleanfid.utils import EXTENSIONS

    assert fid.CLEANFID_IMAGE_SUFFIXES == {f".{e.lower()}" for e in EXTENSIONS} - {".npy"}


def test_help_lists_the_sub_commands(capsys):
    code, out, _ = run_cli(mjhq_fid.app, ["--help"], capsys)
    assert code == 0 and all(name in out for name in ("generate", "score", "report", "all"))

