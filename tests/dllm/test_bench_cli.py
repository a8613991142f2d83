import json

import pytest
from click.testing import CliRunner

from cadence.dllm.bench import _decode_llada2, bench, write_report
from cadence.dllm.cli import dllm
from cadence.dllm.train import save_checkpoint


def test_bench_scores_every_recipe_against_plain_decoding_and_writes_the_frontier(tiny, tmp_path):
    model, tokenizer = tiny
    rows = bench(model, tokenizer, ["semi-ar(block_length=8) + parallel(threshold=0.9) + dual-cache",
                                    "peer:llada2(threshold=0.9)"],
                 tasks=["copy", "add"], prompts_per_task=2, gen_length=16, batch_size=2, reference="semi-ar(block_length=8)",
                 log=lambda *_: None)
    assert rows[0].recipe == "semi-ar(block_length=8)" and rows[0].speedup == 1.0
    assert rows[0].forwards_per_generation == 16  # one token per step
    assert all(set(row.accuracy) == {"copy", "add"} and 0 <= row.mean_accuracy <= 1 for row in rows)
    write_report(rows, tmp_path, {"device": "CPU"})
    assert (tmp_path / "frontier.png").stat().st_size > 0
    assert len(json.loads((tmp_path / "rows.json").read_text())["rows"]) == 3
    assert "| `peer:llada2(threshold=0.9)` |" in (tmp_path / "table.md").read_text()


@pytest.fixture(scope="module")
def checkpoint(tiny, tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-dllm")
    save_checkpoint(*tiny, directory)
    return directory


def test_generate_prints_the_decoded_text_and_the_work(checkpoint):
    result = CliRunner().invoke(dllm, ["generate", "--model", str(checkpoint), "--prompt", "12+34=", "--gen-length",
                                       "32", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("12+34=")
    assert "forwards for 32 tokens; recipe: semi-ar + parallel + dual-cache" in result.output


def test_generate_refuses_bad_input_before_decoding(checkpoint):
    runner = CliRunner()
    result = runner.invoke(dllm, ["generate", "--model", str(checkpoint), "--prompt", "1" * 500, "--gen-length", "32"])
    assert result.exit_code != 0 and "longer than the model's context of 512" in result.output
    result = runner.invoke(dllm, ["generate", "--model", str(checkpoint), "--prompt", "1+1=", "--gen-length", "40"])
    assert result.exit_code != 0 and "block_length=32 does not divide gen_length=40; use gen_length 32 or 64" in result.output
    result = runner.invoke(dllm, ["generate", "--model", str(checkpoint), "--prompt", "1+1=", "--recipe",
                                  "parallel(threshold=2)"])
    assert result.exit_code != 0 and "threshold=2.0 must be in (0.0, 1.0]" in result.output


def test_the_main_generate_and_bench_hand_a_diffusion_lm_to_cadence_dllm(checkpoint, tmp_path):
    from cadence.cli import main

    runner = CliRunner()
    result = runner.invoke(main, ["generate", "--model", str(checkpoint), "--prompt", "12+34=", "--gen-length", "16",
                                  "--recipe", "semi-ar(block_length=8) + parallel(threshold=0.9)", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("12+34=") and "for 16 tokens; recipe: semi-ar(block_length=8) + parallel]" in result.output
    plain = runner.invoke(main, ["generate", "--model", str(checkpoint), "--prompt", "12+34=", "--gen-length", "16"])
    assert plain.exit_code == 0 and "[16 forwards for 16 tokens" in plain.output  # baseline: one token a step
    refused = runner.invoke(main, ["generate", "--model", str(checkpoint), "--prompt", "1+1=", "--steps", "4"])
    assert refused.exit_code != 0 and "--steps: not an option for a diffusion LM" in refused.output
    assert "it takes --model, --prompt, --recipe, --gen-length, --device" in refused.output
    out = tmp_path / "bench"
    recipe = "semi-ar(block_length=8) + parallel(threshold=0.9)"
    result = runner.invoke(main, ["bench", "--model", str(checkpoint), "--recipe", recipe, "--limit", "1",
                                  "--gen-length", "32", "--device", "cpu", "--out", str(out)])
    assert result.exit_code == 0, result.output
    table = (out / "table.md").read_text()
    assert "| `semi-ar(block_length=8) + parallel(threshold=0.9)` |" in table and "peer:llada2" in table
    short = runner.invoke(main, ["bench", "--model", str(checkpoint), "--limit", "1", "--gen-length", "16"])
    assert short.exit_code != 0 and "block_length=32 does not divide gen_length=16; use gen_length 32," in short.output
    refused = runner.invoke(main, ["bench", "--model", str(checkpoint), "--seeds", "3"])
    assert refused.exit_code != 0 and "--seeds: not an option for a diffusion LM" in refused.output


def test_a_diffusers_folder_is_no_diffusion_lm_and_gen_length_is_refused_for_videos(checkpoint, tmp_path):
    from cadence.cli import _is_dllm, main

    (tmp_path / "config.json").write_text('{"_class_name": "WanTransformer3DModel"}')  # a diffusers transformer folder
    assert not _is_dllm(str(tmp_path)) and _is_dllm(str(checkpoint)) and _is_dllm("ref-dllm")
    refused = CliRunner().invoke(main, ["generate", "--model", "ref-video", "--prompt", "a red square", "--gen-length",
                                        "64"])
    assert refused.exit_code != 0 and "--gen-length: an option for diffusion LMs" in refused.output


def test_the_llada2_peer_decodes_a_batch_as_it_decodes_each_prompt_alone():
    """Prompts of different lengths in one batch, on the shipped ref-dllm (which copies exactly):
    right padding made the pipeline start the short prompts' answers after their padding (the
    peer scored 0.07 on the H200 where one prompt at a time matched plain decoding)."""
    from cadence.dllm.load import load

    model, tokenizer = load("ref-dllm")
    words = ["cat", "xyzzy", "banana", "qwertyuiop"]  # 3 to 12 letters, as trained
    batched, _ = _decode_llada2(model, tokenizer, [f"copy:{word}=" for word in words], 32, 32, 0.9)
    alone = [_decode_llada2(model, tokenizer, [f"copy:{word}="], 32, 32, 0.9)[0][0] for word in words]
    assert batched == alone == words
