"""`cadence prompts` and `cadence judge`: scoring files written as cadence writes them, and
every bad input refused in one line naming the value before any judge weights load."""

import pytest
from click.testing import CliRunner
from PIL import Image

from cadence.bench.report import write_video
from cadence.cli import main
from cadence.reference import data

OUTSIDE = "a small magenta hexagon moves left over a plain white background"
CAPTIONS = ["a small red square moves left over a plain white background",
            "a large yellow ring grows over a blue checkerboard"]


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _write(folder, caption, seed=0, suffix=".gif"):
    clip = data.render([data.parse_caption(caption)], frames=16, size=32, seed=seed)[0].transpose(0, 1)  # (T, 3, H, W)
    return write_video(folder / (caption.replace(" ", "-") + suffix), clip)


def test_prompts_prints_the_grammar_and_the_known_words():
    result = invoke("prompts")
    assert result.exit_code == 0
    for word in (*data.SHAPES, *data.COLOURS, *data.SIZES, *data.MOTIONS, *data.BACKGROUNDS, "Examples", "held out"):
        assert word in result.output


def test_judge_scores_a_file_and_a_folder_named_by_caption(tmp_path):
    path = _write(tmp_path, CAPTIONS[0])
    one = invoke("judge", path, "--prompt", CAPTIONS[0])
    assert one.exit_code == 0, one.output
    assert "adherence" in one.output and "background_colour" in one.output and "consistency" in one.output
    _write(tmp_path, CAPTIONS[1])
    folder = invoke("judge", tmp_path)  # captions from the file names
    assert folder.exit_code == 0, folder.output
    assert "2 clip(s)" in folder.output and "FD " in folder.output


def test_judge_takes_a_prompts_file_for_a_folder(tmp_path):
    clips = tmp_path / "clips"
    clips.mkdir()
    first = _write(clips, CAPTIONS[0]).rename(clips / "one.gif")
    table = tmp_path / "captions.tsv"
    table.write_text(f"{first.name}\t{CAPTIONS[0]}\n")
    assert invoke("judge", clips, "--prompts", table).exit_code == 0
    table.write_text("other.gif\ta small red square moves left over a blue gradient\n")
    result = invoke("judge", clips, "--prompts", table)
    assert result.exit_code != 0 and "no caption for 'one.gif'" in result.output


def _tiny_png(tmp_path):
    path = tmp_path / "tiny.png"
    Image.new("RGB", (4, 4)).save(path)
    return path


def _empty_folder(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    return folder


def _damaged_weights(tmp_path):
    path = tmp_path / "judge.safetensors"
    path.write_bytes(b"garbage")
    return path


REFUSALS = {
    "wrong shape": (lambda tmp: [_tiny_png(tmp), "--prompt", CAPTIONS[0]], ["shape (3, 4, 4)", "(T, 3, H, W)"]),
    "empty folder": (lambda tmp: [_empty_folder(tmp), "--prompt", CAPTIONS[0]], ["holds no clip files", ".gif"]),
    "outside the grammar": (lambda tmp: [_write(tmp, CAPTIONS[0]), "--prompt", OUTSIDE],
                            ["unknown words 'magenta', 'hexagon'", "colours: red"]),
    "missing path": (lambda tmp: [tmp / "nope.gif", "--prompt", CAPTIONS[0]], ["nope.gif", "does not exist"]),
    "damaged judge": (lambda tmp: [_write(tmp, CAPTIONS[0]), "--prompt", CAPTIONS[0], "--judge", _damaged_weights(tmp)],
                      ["judge.safetensors", "is damaged", "cadence.judge.train"]),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_bad_input_is_refused_naming_the_value_before_the_judge_loads(tmp_path, loads, case):
    make, fragments = REFUSALS[case]
    result = invoke("judge", *make(tmp_path))
    assert result.exit_code != 0 and "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    assert loads == []
