from cadence.bench import frontier


def _row(recipe, ideal, psnr, ssim=0.9):
    return {"recipe": recipe, "ideal_speedup": ideal, "speedup": ideal * 0.95, "psnr_mean": psnr,
            "ssim_mean": ssim, "compute_fraction": 1 / ideal}


SUMMARY = [
    _row("baseline", 1.0, float("inf"), 1.0),
    _row("teacache(budget=0.5)", 2.0, 34.0),
    _row("teacache(budget=0.25)", 4.0, 28.0),
    _row("fixed-interval(budget=0.5, cfg_reuse=true)", 2.0, 33.0),
    _row("fixed-interval(budget=0.4)", 2.5, 27.0),
    _row("diffusers-fbcache(threshold=0.1)", 1.8, 30.0),
    _row("diffusers-fbcache(threshold=0.3)", 4.5, 25.0),
]


def test_technique_names_group_settings_and_mark_cfg_reuse():
    assert frontier.technique_of("teacache(budget=0.5)") == "teacache"
    assert frontier.technique_of("fixed-interval(budget=0.5, cfg_reuse=true)") == "fixed-interval+cfg-reuse"
    assert frontier.technique_of("first-blocks + sparse-window(density=0.25)") == "first-blocks + sparse-window"
    assert frontier.is_peer("diffusers-fbcache") and not frontier.is_peer("teacache")


def test_pareto_keeps_only_points_nothing_beats_on_both_axes():
    points = [(1.0, 30, "a"), (2.0, 32, "b"), (2.0, 31, "c"), (3.0, 29, "d"), (2.5, 28, "e")]
    assert [p[2] for p in frontier.pareto(points)] == ["b", "d"]


def test_dominance_compares_each_peer_setting_with_cadence_at_least_as_fast():
    rows = {r["peer"]: r for r in frontier.dominance(SUMMARY)}
    slow = rows["diffusers-fbcache(threshold=0.1)"]
    assert slow["cadence"] == "teacache(budget=0.5)" and slow["dominated"]
    fast = rows["diffusers-fbcache(threshold=0.3)"]
    assert fast["cadence"] is None and not fast["dominated"]  # nothing of ours is that fast


def test_plot_and_markdown(tmp_path):
    path = frontier.plot_frontiers(tmp_path / "frontier.png", SUMMARY)
    assert path.stat().st_size > 10_000
    text = frontier.markdown(SUMMARY)
    assert "| teacache | `teacache(budget=0.5)` |" in text
    assert "| `diffusers-fbcache(threshold=0.3)` | 4.50x | 25.00 | none as fast" in text
