import json

import pytest

from dvsa.data.prepare import KarpathySource, PrepareOptions, VGSource, prepare_karpathy, prepare_vg
from dvsa.data.stats import caption_stats, collect


def test_caption_stats_by_hand():
    s = caption_stats([["a", "red", "ball"], ["a", "dog"], ["a"]], images=2, top=2)
    assert s["captions"] == 3 and s["captions_per_image"] == 1.5
    assert s["length_mean"] == 2.0 and s["length_median"] == 2 and s["length_max"] == 3
    assert s["length_histogram"] == {"1": 1, "2": 1, "3": 1}
    assert s["vocabulary"] == 4 and s["vocabulary_min5"] == 0
    assert s["words_per_image"] == 3.0
    assert s["top_words"][0] == ("a", 3)


@pytest.fixture(scope="module")
def prepared(synth_world, tmp_path_factory):
    base = tmp_path_factory.mktemp("stats")
    local = PrepareOptions(use_ray=False, progress=False)
    prepare_vg(VGSource(str(synth_world / "vg"), split_file=str(synth_world / "vg" / "densecap_splits.json")),
               str(base / "vg"), local)
    prepare_karpathy(KarpathySource(str(synth_world / "karpathy" / "dataset_synth.json"), str(synth_world / "vg")),
                     str(base / "kp"), local)
    return base


def test_region_vs_full_image(prepared, synth_world):
    stats = collect([str(prepared / "vg"), str(prepared / "kp")], "train")
    truth = json.loads((synth_world / "truth.json").read_text())
    train = [t for t in truth["images"] if t["split"] == "train"]
    assert stats["region"]["captions"] == sum(len(t["regions"]) for t in train)
    assert stats["full_image"]["captions"] == 5 * len(train)
    assert stats["region"]["images"] == stats["full_image"]["images"] == len(train)
    # the paper's contrast: short region phrases, many per image; longer sentences, five per image
    assert stats["full_image"]["length_mean"] > 2 * stats["region"]["length_mean"]
    assert stats["full_image"]["captions_per_image"] == 5


def test_cli_stats(prepared, tmp_path, capsys):
    from dvsa.cli import main

    assert main(["stats", str(prepared / "vg"), str(prepared / "kp"), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "mean length (words)" in out and "top words (region)" in out
    assert (tmp_path / "stats.png").stat().st_size > 1000
    assert json.loads((tmp_path / "stats.json").read_text())["split"] == "train"
    assert main(["stats", str(prepared / "vg"), "--split", "nosuch", "--out", str(tmp_path)]) == 1


def test_streamed_median_equals_the_median_of_the_values():
    import random
    import statistics
    from collections import Counter

    from dvsa.data.stats import _median

    rng = random.Random(0)
    for n in (1, 2, 3, 4, 7, 10, 51):
        values = [rng.randint(1, 6) for _ in range(n)]
        assert _median(Counter(values)) == statistics.median(values), values
    assert _median(Counter()) == 0.0


def test_cli_stats_writes_to_an_fsspec_url(prepared, tmp_path, monkeypatch, capsys):
    import fsspec

    from dvsa.cli import main

    monkeypatch.chdir(tmp_path)
    rc = main(["stats", str(prepared / "vg"), str(prepared / "kp"), "--out", "memory://dvsa-stats/out"])
    assert rc == 0 and "wrote memory://dvsa-stats/out/stats.json" in capsys.readouterr().out
    fs = fsspec.filesystem("memory")
    assert fs.cat("/dvsa-stats/out/stats.png")[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(fs.cat("/dvsa-stats/out/stats.json"))["region"]["captions"] > 0
    assert not list(tmp_path.iterdir())                  # nothing written into the working directory
