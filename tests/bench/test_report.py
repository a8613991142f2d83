import pytest
import torch
from PIL import Image

from cadence.bench.report import plot_pareto, sample_strip, summarize, write_report, write_video

INF = float("inf")


def _row(recipe, seed, latency, psnr, ssim, mem, fraction=None, prompt="a cat"):
    return {
        "recipe": recipe,
        "prompt": prompt,
        "seed": seed,
        "latency_s": latency,
        "step_latency_s": latency / 10,
        "speedup": 4.0 / latency,
        "psnr": psnr,
        "ssim": ssim,
        "peak_mem_bytes": mem,
        "compute_fraction": fraction,
        "ideal_speedup": None if fraction is None else 1 / fraction,
    }


ROWS = [
    _row("fixed-interval", 0, 2.0, 30.0, 0.90, 100),
    _row("baseline", 0, 4.0, INF, 1.0, 300),
    _row("fixed-interval", 1, 1.0, INF, 1.0, 200),
    _row("fixed-interval", 2, 1.0, 20.0, 0.80, 150),
    _row("baseline", 1, 4.0, INF, 1.0, 250),
    _row("teacache", 0, 2.0, 25.0, 0.85, 100, fraction=0.5),
    _row("teacache", 1, 2.0, 35.0, 0.95, 100, fraction=0.25),
]


def _summary():
    return {s["recipe"]: s for s in summarize(ROWS)}


def test_summarize_keeps_first_seen_order():
    assert [s["recipe"] for s in summarize(ROWS)] == ["fixed-interval", "baseline", "teacache"]


def test_summarize_means_mins_and_max():
    fi = _summary()["fixed-interval"]
    assert fi["n"] == 3
    assert fi["latency_s"] == pytest.approx(4 / 3)
    assert fi["step_latency_s"] == pytest.approx(4 / 30)
    # a ratio of totals: baseline latency 4.0 over the mean latency 4/3, not the mean of
    # the per-sample speedups (2 + 4 + 4) / 3
    assert fi["speedup"] == pytest.approx(3.0)
    assert fi["ssim_mean"] == pytest.approx(0.9)
    assert fi["ssim_min"] == pytest.approx(0.8)
    assert fi["peak_mem_bytes"] == 200


def test_summarize_psnr_inf_handling():
    s = _summary()
    # one identical sample: the mean is over the finite ones, the min is the worst
    assert s["fixed-interval"]["psnr_mean"] == pytest.approx(25.0)
    assert s["fixed-interval"]["psnr_min"] == pytest.approx(20.0)
    assert s["fixed-interval"]["n_identical"] == 1
    # all identical: inf both ways
    assert s["baseline"]["psnr_mean"] == INF
    assert s["baseline"]["psnr_min"] == INF


def test_summarize_optional_fractions():
    s = _summary()
    assert s["fixed-interval"]["compute_fraction"] is None
    assert s["fixed-interval"]["ideal_speedup"] is None
    assert s["teacache"]["compute_fraction"] == pytest.approx(0.375)
    assert s["teacache"]["ideal_speedup"] == pytest.approx(1 / 0.375)  # total work, not mean of 1/fraction


META = {
    "model": "tiny-dit",
    "device": "cpu",
    "torch": "2.13.0",
    "steps": 10,
    "prompts": 2,
    "seeds": [0, 1, 2],
    "date": "2025-01-01",
    "command": "cadence bench --recipes all",
}


def test_write_report_contents(tmp_path):
    path = write_report(tmp_path / "report.md", summarize(ROWS), META)
    text = path.read_text()
    for recipe in ("fixed-interval", "baseline", "teacache"):
        assert recipe in text
    for value in ("tiny-dit", "cpu", "2.13.0", "10", "0, 1, 2", "2025-01-01", "cadence bench --recipes all"):
        assert value in text
    assert "inf (identical)" in text
    assert "How to read" in text
    assert "2.67x" in text  # teacache ideal speedup
    table = [line for line in text.splitlines() if line.startswith("| `")]
    assert len(table) == 3 and all(line.count(" | ") == 11 for line in table)
    assert "## Check these" not in text  # nothing above its ideal, no spread recorded


def _timed_row(recipe, speedup, fraction, spread, recipe_params=None):
    row = _row(recipe, 0, 4.0 / speedup, 30.0, 0.9, 100, fraction=fraction)
    return {**row, "spread": spread, "recipe_params": recipe_params or recipe}


def test_a_speedup_above_its_ideal_is_flagged():
    """The case that went unwarned: 4.31x against an ideal of 2.50x."""
    flagged, = summarize([_timed_row("fixed-interval", 4.31, 0.4, 0.02)])
    assert len(flagged["flags"]) == 1 and "4.31x is above its ideal 2.50x" in flagged["flags"][0]
    fine, = summarize([_timed_row("fixed-interval", 2.3, 0.4, 0.02)])
    assert fine["flags"] == []
    no_ideal, = summarize([_timed_row("compile", 1.3, None, 0.02)])
    assert no_ideal["flags"] == []


def test_a_high_spread_is_flagged_and_the_largest_reported():
    rows = [_timed_row("fixed-interval", 1.9, 0.5, 0.03), _timed_row("fixed-interval", 1.8, 0.5, 0.25)]
    summary, = summarize(rows)
    assert summary["spread"] == pytest.approx(0.25)
    assert len(summary["flags"]) == 1 and "timing spread 25% (over 10%)" in summary["flags"][0]
    assert summarize(rows, spread_tolerance=0.3)[0]["flags"] == []


def test_the_report_lists_the_flags_and_every_recipes_parameters(tmp_path):
    spelled = "fixed-interval(interval=2, cooldown=0, warmup=1, budget=0.0, cfg_reuse=false)"
    rows = [_timed_row("baseline", 1.0, 1.0, 0.3), _timed_row("fixed-interval", 4.31, 0.4, 0.02, spelled)]
    text = write_report(tmp_path / "report.md", summarize(rows), META).read_text()
    check = text[text.index("## Check these"):text.index("## Recipes")]
    assert "`baseline`: timing spread 30%" in check and "`fixed-interval`: speedup 4.31x is above its ideal" in check
    assert f"- `fixed-interval`: `{spelled}`" in text
    table = [line for line in text.splitlines() if line.startswith("| `fixed-interval`")]
    assert "2.50x (!)" in table[0] and "2%" in table[0]


def test_plot_pareto_writes_png(tmp_path):
    path = plot_pareto(tmp_path / "pareto.png", summarize(ROWS))
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.size == (840, 600)


def test_plot_pareto_all_identical(tmp_path):
    rows = [_row("baseline", 0, 4.0, INF, 1.0, 1)]
    with Image.open(plot_pareto(tmp_path / "p.png", summarize(rows))) as im:
        assert im.size == (840, 600)


def test_sample_strip_size(tmp_path):
    video = torch.rand(10, 3, 8, 12) * 2 - 1  # (T, 3, H, W)
    columns = [("baseline", video), ("fixed-interval(interval=3)", video * 0.9), ("image", video[0])]
    path = sample_strip(tmp_path / "strip.png", columns, frames_shown=4, scale=3)
    with Image.open(path) as im:
        assert im.format == "PNG"
        width, height = im.size
    assert width == 3 * 12 * 3 + 2 * 2  # three columns, 2 px gaps
    frames_h = 4 * 8 * 3 + 3 * 2  # four rows, 2 px gaps
    assert frames_h < height < frames_h + 100  # plus the label band


def test_sample_strip_short_video_shows_all_frames(tmp_path):
    video = torch.zeros(2, 3, 4, 4)
    path = sample_strip(tmp_path / "s.png", [("a", video)], frames_shown=6, scale=2)
    with Image.open(path) as im:
        frames_h = 2 * 4 * 2 + 2
        assert im.size[0] == 8 and frames_h < im.size[1] < frames_h + 100


def test_write_video_gif_frames(tmp_path):
    t = 5
    g = torch.Generator().manual_seed(0)
    video = torch.rand(t, 3, 6, 7, generator=g) * 2 - 1  # distinct frames (PIL merges repeats)
    path = write_video(tmp_path / "clip.gif", video, fps=8, scale=2)
    with Image.open(path) as im:
        assert im.format == "GIF"
        assert im.n_frames == t
        assert im.size == (14, 12)
        assert im.info.get("loop") == 0


def test_write_video_mp4_or_gif_fallback(tmp_path):
    video = torch.rand(4, 3, 7, 9) * 2 - 1  # odd sides: exercises the even-size padding
    path = write_video(tmp_path / "clip.mp4", video, fps=4, scale=1)
    # ffmpeg may be unavailable on a test box; then a GIF is written next to it (with a warning)
    assert path.exists() and path.stat().st_size > 0
    assert path.suffix in (".mp4", ".gif")
