"""``pipeline.screen`` fails closed on whatever it is given: every frame of a multi-frame image
is scored, every file under a folder is screened or skipped with its reason (and blocked), the
decoded size is bounded before decoding, one bad file never blocks another, and ``--out`` never
destroys a file, runs a formula in a spreadsheet, or loses a file name."""
import csv
import os
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageFile
import PIL.ImageSequence
import pytest

from pipeline import screen
from pipeline.espresso import ConceptChecker
from pipeline.mini import shapes

REPO = Path(__file__).resolve().parents[1]
CHECKER = str(REPO / "data" / "checker")


@pytest.fixture(scope="module")
def checker():
    return ConceptChecker.from_pretrained(CHECKER, device="cpu")


@pytest.fixture(scope="module")
def pictures(checker):
    """A harmless render (no concept fires) and a Zorbo render that is blocked, each with a
    clear margin, chosen by the checker itself."""
    rng = np.random.default_rng(3)
    harmless = shapes.render_many([shapes.sample_scene(rng, character_prob=0.0)
                                   for _ in range(16)], rng)
    zorbo = shapes.render_many([shapes.sample_scene(rng, character="zorbo") for _ in range(16)],
                               rng)
    p_harmless = checker.check(harmless).p_unacceptable.max(1)
    p_zorbo = checker.check(zorbo).p_unacceptable[:, checker.names.index("zorbo")]
    assert p_harmless.min() < 0.1 and p_zorbo.max() > 0.9
    return harmless[int(np.argmin(p_harmless))], zorbo[int(np.argmax(p_zorbo))]


def run(args: list, out: Path, *flags: str) -> dict[str, list[dict]]:
    """Screen with the shipped checker; the CSV's rows per file name."""
    screen.main([CHECKER, "--out", str(out), *flags, "--", *map(str, args)])
    with open(out, newline="", encoding="utf-8", errors="surrogateescape") as f:
        rows = list(csv.DictReader(f))
    by_file = {}
    for row in rows:
        by_file.setdefault(row["path"], []).append(row)
    return by_file


def blocked(rows: list[dict]) -> bool:
    assert len({r["blocked"] for r in rows}) == 1
    return rows[0]["blocked"] == "True"


# ---- every frame --------------------------------------------------------------------------
def save_frames(path: Path, frames: list[np.ndarray], fmt: str) -> None:
    images = [PIL.Image.fromarray(f) for f in frames]
    options = {"WEBP": {"lossless": True}, "GIF": {"duration": 100}}.get(fmt, {})
    images[0].save(path, format=fmt, save_all=True, append_images=images[1:], **options)


@pytest.mark.parametrize("fmt", ["GIF", "PNG", "WEBP", "TIFF"])
def test_a_later_frame_that_shows_the_concept_blocks_the_file(pictures, checker, tmp_path, fmt):
    """Frame 0 harmless, frame 1 Zorbo: blocked on frame 1's score. The same file with frame 0
    alone passes, so only scoring frame 1 can block it."""
    harmless, zorbo = pictures
    save_frames(tmp_path / "animated", [harmless, zorbo, harmless], fmt)
    save_frames(tmp_path / "still", [harmless], fmt)
    rows = run([tmp_path / "animated", tmp_path / "still"], tmp_path / "out.csv")
    animated, still = rows[str(tmp_path / "animated")], rows[str(tmp_path / "still")]
    assert blocked(animated) and not blocked(still)
    assert animated[0]["frames"] == "3" and still[0]["frames"] == "1"
    with PIL.Image.open(tmp_path / "animated") as image:  # the frames as the file holds them
        frames = [np.array(f.convert("RGB")) for f in PIL.ImageSequence.Iterator(image)]
    reference = checker.check(frames)
    assert [float(r["p_unacceptable"]) for r in animated] == pytest.approx(
        reference.p_unacceptable.max(0), abs=1e-5)
    assert [r["fired"] == "True" for r in animated] == reference.fired.any(0).tolist()
    assert reference.blocked.tolist() == [False, True, False]  # frame 1 alone blocks it


# ---- every file, by content --------------------------------------------------------------
def test_every_file_under_a_folder_is_screened_or_skipped_with_its_reason(pictures, tmp_path):
    harmless, zorbo = pictures
    folder, elsewhere = tmp_path / "images", tmp_path / "elsewhere"
    (folder / "sub").mkdir(parents=True)
    elsewhere.mkdir()
    PIL.Image.fromarray(zorbo).save(folder / "no_extension", format="PNG")
    PIL.Image.fromarray(zorbo).save(folder / "photo.jfif", format="JPEG", quality=95)
    PIL.Image.fromarray(zorbo).save(folder / "sub" / "picture.avif", format="AVIF", quality=95)
    PIL.Image.fromarray(harmless).save(folder / "harmless.png")
    PIL.Image.fromarray(zorbo).save(elsewhere / "linked.png")
    (folder / "notes.txt").write_text("not an image")
    (folder / ".hidden.png").write_bytes(b"\x89PNG but truncated")
    os.mkfifo(folder / "pipe.png")  # opening it would wait forever
    (folder / "to_elsewhere").symlink_to(elsewhere, target_is_directory=True)
    (folder / "sub" / "loop").symlink_to(folder, target_is_directory=True)
    (folder / "dangling.png").symlink_to(tmp_path / "gone.png")
    rows = run([folder], tmp_path / "out.csv")
    by_name = {os.path.relpath(path, folder): r for path, r in rows.items()}
    assert set(by_name) == {"no_extension", "photo.jfif", "sub/picture.avif", "harmless.png",
                            "to_elsewhere/linked.png", "notes.txt", ".hidden.png", "pipe.png",
                            "sub/loop", "dangling.png"}
    for name in ("no_extension", "photo.jfif", "sub/picture.avif", "to_elsewhere/linked.png"):
        assert blocked(by_name[name]) and by_name[name][0]["error"] == "", name  # scored
    assert not blocked(by_name["harmless.png"])
    reasons = {"notes.txt": "unreadable image file", ".hidden.png": "unreadable image file",
               "pipe.png": "skipped: a named pipe", "sub/loop": "searched already",
               "dangling.png": "broken link"}
    for name, reason in reasons.items():
        assert blocked(by_name[name]) and reason in by_name[name][0]["error"], name
        assert by_name[name][0]["p_unacceptable"] == "" and by_name[name][0]["frames"] == "0"


# ---- bounded before decoding; one bad file never blocks another ---------------------------
def test_smoothing_certifies_each_files_verdict_and_blocks_what_it_cannot_certify(
        pictures, tmp_path):
    harmless, zorbo = pictures
    for name, image in (("harmless.png", harmless), ("zorbo.png", zorbo)):
        PIL.Image.fromarray(image).save(tmp_path / name)
    (tmp_path / "broken.png").write_bytes(b"not an image")
    rows = run([tmp_path], tmp_path / "out.csv", "--smoothing", "0.12", "--samples", "300")
    verdict = {Path(k).name: (v[0]["smoothed_blocked"], float(v[0]["certified_radius"]))
               for k, v in rows.items() if k.endswith(".png")}
    assert verdict["zorbo.png"][0] == "True" and verdict["zorbo.png"][1] > 0.05
    assert verdict["harmless.png"][0] == "False" and verdict["harmless.png"][1] > 0.05
    assert verdict["broken.png"] == ("True", 0.0)        # unreadable: blocked, not certified
    plain = run([tmp_path / "harmless.png"], tmp_path / "plain.csv")
    assert "certified_radius" not in next(iter(plain.values()))[0]  # columns only when asked


def test_smoothing_settings_are_checked_before_any_work(tmp_path, capsys):
    with pytest.raises(SystemExit):
        screen.main([CHECKER, "x.png", "--out", str(tmp_path / "o.csv"), "--smoothing", "0"])
    assert "sigma" in capsys.readouterr().err


def test_a_file_over_the_pixel_budget_is_blocked_unread_and_blocks_nothing_else(
        pictures, checker, tmp_path, monkeypatch):
    harmless, zorbo = pictures
    PIL.Image.fromarray(harmless).save(tmp_path / "a_harmless.png")
    PIL.Image.new("1", (10_000, 10_000)).save(tmp_path / "b_huge.png")  # 1.25 GB as RGB
    PIL.Image.new("RGB", (1, 200_000)).save(tmp_path / "c_strip.png")  # resizes to 1.4e9 px
    PIL.Image.fromarray(zorbo).save(tmp_path / "d_zorbo.png")
    (tmp_path / "e_broken.png").write_bytes(b"not an image")
    decoded = []
    load = PIL.ImageFile.ImageFile.load
    monkeypatch.setattr(PIL.ImageFile.ImageFile, "load",
                        lambda image: decoded.append(Path(image.filename).name) or load(image))
    rows = run([tmp_path / f for f in ("a_harmless.png", "b_huge.png", "c_strip.png",
                                      "d_zorbo.png", "e_broken.png")], tmp_path / "out.csv")
    assert "b_huge.png" not in decoded and "c_strip.png" not in decoded
    assert "a_harmless.png" in decoded  # the spy works
    for name in ("b_huge.png", "c_strip.png"):
        assert blocked(rows[str(tmp_path / name)]), name
        assert "too large" in rows[str(tmp_path / name)][0]["error"]
    good = [rows[str(tmp_path / n)] for n in ("a_harmless.png", "d_zorbo.png")]
    reference = checker.check([harmless, zorbo])
    for file_rows, p, is_blocked in zip(good, reference.p_unacceptable, reference.blocked):
        assert [float(r["p_unacceptable"]) for r in file_rows] == pytest.approx(p, abs=1e-5)
        assert blocked(file_rows) == is_blocked and file_rows[0]["error"] == ""
    assert reference.blocked.tolist() == [False, True]


def test_the_budget_counts_every_frame(pictures, tmp_path):
    """32 x 32 frames are 1024 pixels each: 4 fit a budget of 4096, 5 do not."""
    harmless, _ = pictures
    save_frames(tmp_path / "four.gif", [harmless, 255 - harmless] * 2, "GIF")
    save_frames(tmp_path / "five.gif", [harmless, 255 - harmless] * 2 + [harmless], "GIF")
    rows = run([tmp_path / "four.gif", tmp_path / "five.gif"], tmp_path / "out.csv",
               "--max-pixels", "4096")
    assert rows[str(tmp_path / "four.gif")][0]["frames"] == "4"
    five = rows[str(tmp_path / "five.gif")]
    assert blocked(five) and "too large" in five[0]["error"] and five[0]["frames"] == "0"


# ---- --out never destroys data ----------------------------------------------------------
@pytest.fixture()
def one_image(pictures, tmp_path):
    PIL.Image.fromarray(pictures[0]).save(tmp_path / "image.png")
    return tmp_path / "image.png"


def refused(args: list, out: Path, *flags: str) -> str:
    with pytest.raises(SystemExit) as err:
        screen.main([CHECKER, *map(str, args), "--out", str(out), *flags])
    message = str(err.value)
    assert message.startswith("error: --out") and "\n" not in message
    return message


def test_an_existing_out_is_replaced_only_with_force_and_only_if_a_screen_csv(one_image, tmp_path):
    out = tmp_path / "results.csv"
    out.write_text("someone's work\n")
    assert "give --force" in refused([one_image], out)
    assert "not an earlier CSV" in refused([one_image], out, "--force")
    assert out.read_text() == "someone's work\n"
    out.unlink()
    run([one_image], out)
    earlier = out.read_bytes()
    assert "give --force" in refused([one_image], out)
    assert out.read_bytes() == earlier
    assert str(one_image) in run([one_image], out, "--force")


def test_out_is_never_an_input(one_image, tmp_path):
    """``screen CHECKER --out *.png``: the shell makes the first image the output."""
    second = tmp_path / "second.png"
    second.write_bytes(one_image.read_bytes())
    before = one_image.read_bytes()
    assert "one of the files to screen" in refused([one_image, second], one_image, "--force")
    assert "one of the files to screen" in refused([tmp_path], one_image, "--force")
    (tmp_path / "link.png").symlink_to(one_image)
    assert "one of the files to screen" in refused([tmp_path / "link.png"], one_image, "--force")
    assert one_image.read_bytes() == before


def test_an_out_that_cannot_be_written_is_refused_before_screening(one_image, tmp_path,
                                                                   monkeypatch):
    monkeypatch.setattr(screen, "screen_files", lambda *a: pytest.fail("screened first"))
    assert "is a folder" in refused([one_image], tmp_path)
    assert "cannot be written" in refused([one_image], one_image / "out.csv")
    os.mkfifo(tmp_path / "pipe")
    assert "not a regular file" in refused([one_image], tmp_path / "pipe", "--force")


def test_an_interrupted_screen_leaves_the_earlier_out_and_no_temporary(one_image, tmp_path,
                                                                       monkeypatch):
    out = tmp_path / "results.csv"
    run([one_image], out)
    earlier = out.read_bytes()

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(screen, "screen_files", interrupted)
    with pytest.raises(KeyboardInterrupt):
        screen.main([CHECKER, str(one_image), "--out", str(out), "--force"])
    assert out.read_bytes() == earlier
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image.png", "results.csv"]


def test_formulas_are_neutralised_and_any_file_name_is_written(pictures, tmp_path, monkeypatch):
    """Files named relative to the working folder: the cell is the bare name."""
    monkeypatch.chdir(tmp_path)
    names = ["=HYPERLINK(\"x\").png", "+1.png", "-1.png", "@SUM(A1).png", "\tx.png",
             "\rx.png", " =1+1.png", "\uff1d1+1.png", "plain.png", os.fsdecode(b"caf\xe9.png")]
    for name in names:
        PIL.Image.fromarray(pictures[0]).save(name, format="PNG")
    rows = run(names, tmp_path / "out.csv")
    assert set(rows) == {"'" + n for n in names[:8]} | set(names[8:])
    assert b"\ncaf\xe9.png," in (tmp_path / "out.csv").read_bytes()  # its bytes, as on disk


def test_names_cells_with_a_formula_start(tmp_path):
    assert [screen.spreadsheet_safe(t) for t in ("=1", "+1", "-1", "@a", "\t1", "\r1", " =1",
                                                 "\uff1d1", "a=1", "0.5")] == [
        "'=1", "'+1", "'-1", "'@a", "'\t1", "'\r1", "' =1", "'\uff1d1", "a=1", "0.5"]
