"""Token level: attention over fewer query-key pairs (sparse patterns) and the choice of
dense attention backend."""

# The sparse pattern per model family, read off the reference-model frontier
# (benchmarks/results/sparse/frontier-{video,image}.md, 8 held-out prompts x 2 seeds):
# on ref-video (Wan) the per-head router is the best pattern at every density swept; on
# ref-image (FLUX) the static 3D window ties the best at 0.5 and costs least at run time.
# Density 0.5: at 0.25 the best pattern loses another 4.4 dB on ref-video (27.7 -> 23.3)
# and 5.8 dB on ref-image (24.7 -> 18.9) (RESULTS.md, "Sparse attention"). Video families
# follow Wan's measurement, image families FLUX's.
DEFAULT_PATTERN = {
    "wan": "sparse-router(density=0.5)",
    "cogvideox": "sparse-router(density=0.5)",
    "hunyuan_video": "sparse-router(density=0.5)",
    "ltx": "sparse-router(density=0.5)",
    "flux": "sparse-window(density=0.5)",
    "sd3": "sparse-window(density=0.5)",
}
