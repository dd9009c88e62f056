"""tools/publish.py (shareable model + model card) and tools/internals_figure.py."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
from asteroid.models import ConvTasNet

from conftest import TINY_MODEL
from tools import internals_figure, publish
from tools.internals_figure import make_figure, plot_internals, upgma_order
from tools.publish import PublishError, licence_info
from utils.config import read_conf, write_conf

SR = 8000
TINY = dict(n_src=2, **TINY_MODEL, sample_rate=SR)
NC_SA = "//creativecommons.org/licenses/by-nc-sa/4.0/"
BY = "https://creativecommons.org/licenses/by/4.0/"


@pytest.fixture
def tiny_exp(tmp_path, repo_root) -> Path:
    """An experiment as training leaves it: best_model.pth (asteroid format), conf.yml."""
    exp = tmp_path / "exp" / "tiny"
    exp.mkdir(parents=True)
    torch.manual_seed(0)
    package = ConvTasNet(**TINY).serialize()
    # torch >= 2.6 loads with weights_only=True, which refuses asteroid's TorchVersion object.
    package["infos"]["software_versions"] = {
        k: str(v) for k, v in package["infos"]["software_versions"].items()}
    torch.save(package, exp / "best_model.pth")
    conf = read_conf(repo_root / "conf.yml")
    conf["model"].update({k: v for k, v in TINY.items() if k in conf["model"]})
    write_conf(conf, exp / "conf.yml")
    return exp


@pytest.fixture
def data_dir(tmp_path) -> Path:
    """raw/recordings.csv, clips/clips.csv and BSD-2mix/dataset.json of a tiny download."""
    data = tmp_path / "data"
    (data / "raw").mkdir(parents=True)
    (data / "clips").mkdir()
    (data / "BSD-2mix").mkdir()
    pd.DataFrame([
        dict(id=101, genus="Coereba", species="Coereba flaveola", english_name="Bananaquit",
             recordist="Ana Rivera", licence="https:" + NC_SA, url="https://xeno-canto.org/101"),
        dict(id=102, genus="Tiaris", species="Tiaris olivaceus", english_name="Grassquit",
             recordist="Ben Ortiz", licence=BY, url="https://xeno-canto.org/102"),
        dict(id=103, genus="Vireo", species="Vireo altiloquus", english_name="Black-whiskered Vireo",
             recordist="Cruz Diaz", licence="https:" + NC_SA, url="https://xeno-canto.org/103"),
    ]).to_csv(data / "raw" / "recordings.csv", index=False)
    pd.DataFrame([dict(clip_id=f"XC{r}_{i}", recording_id=r, split=s, path=f"wav/XC{r}_{i}.wav")
                  for r, s, n in ((101, "tr", 3), (102, "tr", 2), (103, "cv", 1))
                  for i in range(n)]).to_csv(data / "clips" / "clips.csv", index=False)
    (data / "BSD-2mix" / "dataset.json").write_text(json.dumps({
        "sample_rate": SR, "seed": 17, "snr_db": [-5.0, 5.0], "mode": "max", "n_src": 2,
        "splits": {"tr": {"n_mixtures": 123, "hours": 3.0, "n_species": 2, "n_recordings": 2,
                          "n_clips": 5}}}))
    return data


def test_licence_info():
    assert licence_info(NC_SA) == {"name": "CC BY-NC-SA 4.0", "url": "https:" + NC_SA,
                                   "non_commercial": True, "share_alike": True,
                                   "no_derivatives": False}
    assert licence_info(BY)["name"] == "CC BY 4.0"
    assert not licence_info(BY)["non_commercial"]


def test_licence_implications_of_the_dumps_licence_mix():
    """BY-NC-SA 3.0/4.0 plus BY-SA 4.0, as in the shared xeno-canto dump: NC, and a conflict."""
    recordings = pd.DataFrame({"licence": [NC_SA, "//creativecommons.org/licenses/by-nc-sa/3.0/",
                                           "//creativecommons.org/licenses/by-sa/4.0/"],
                               "recordist": ["A", "B", "C"]})
    text = "\n".join(publish.licence_implications(publish.licence_summary(recordings)))
    assert "**NonCommercial**: 2 training recording(s)" in text
    assert "Licence conflict" in text and "none consistent" in text
    only_nc_sa = publish.licence_summary(recordings.iloc[:2])
    assert "**CC BY-NC-SA 4.0**" in "\n".join(publish.licence_implications(only_nc_sa))


def test_publish_writes_a_loadable_model_and_a_model_card(tiny_exp, data_dir):
    (tiny_exp / "eval").mkdir()
    (tiny_exp / "eval" / "final_metrics.json").write_text(json.dumps({"si_sdr": 7.25,
                                                                      "si_sdr_imp": 9.5}))
    out = publish.publish(tiny_exp, data_dir, tiny_exp / "publish")

    loaded = ConvTasNet.from_pretrained(str(out / "model.pth"))
    original = torch.load(tiny_exp / "best_model.pth")["state_dict"]
    for name, tensor in loaded.state_dict().items():
        torch.testing.assert_close(tensor, original[name])
    assert loaded(torch.zeros(1, 800)).shape == (1, 2, 800)
    package = torch.load(out / "model.pth")
    assert package["dataset"] == "BSD-2mix"
    assert {entry["author"] for entry in package["licenses"]} == {"Ana Rivera", "Ben Ortiz"}

    card = (out / "README.md").read_text()
    for expected in ("BSD-2mix", "| tr | 123 | 3 |",            # data set figures
                     "Ana Rivera", "Ben Ortiz", "XC101", "CC BY-NC-SA 4.0", "CC BY 4.0",
                     "NonCommercial", "ShareAlike",              # licence implications
                     "| n_filters | 16 |",                       # hyperparameters
                     "| si_sdr | 7.25 |"):                       # metrics
        assert expected in card, expected
    assert "Cruz Diaz" not in card.split("### Recordists")[1]  # a cv recording, not trained on


def test_publish_without_metrics_and_with_a_missing_input(tiny_exp, data_dir, capsys):
    card = (publish.publish(tiny_exp, data_dir, tiny_exp / "publish") / "README.md").read_text()
    assert "Not evaluated yet" in card
    (data_dir / "BSD-2mix" / "dataset.json").unlink()
    with pytest.raises(PublishError, match=r"dataset\.json not found: run stage 2"):
        publish.publish(tiny_exp, data_dir, tiny_exp / "publish2")
    assert publish.main(["--exp_dir", str(tiny_exp), "--data_dir", str(data_dir)]) == 1
    assert "dataset.json not found" in capsys.readouterr().err
    assert not (tiny_exp / "publish2").exists()


def test_upgma_order_keeps_clusters_together():
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal(8), rng.standard_normal(8)
    filters = np.stack([a, b, a + 0.01, b + 0.01, a - 0.01, b - 0.02])
    order = list(upgma_order(filters))
    assert sorted(order) == list(range(6))
    groups = ["a" if i % 2 == 0 else "b" for i in order]
    assert groups in (["a"] * 3 + ["b"] * 3, ["b"] * 3 + ["a"] * 3)


def _tiny_bsd(tmp_path: Path) -> Path:
    """A one-mixture BSD-2mix tt split."""
    root = tmp_path / "BSD-2mix"
    t = np.arange(int(1.5 * SR)) / SR
    sources = [0.3 * np.sin(2 * np.pi * 1500 * t) * (t < 0.9),
               0.2 * np.sin(2 * np.pi * 3000 * t) * (t > 0.5)]
    row = {"mixture_id": "m1", "mixture_path": "tt/mix/m1.wav", "length": t.size}
    for sub, audio in [("mix", sources[0] + sources[1])] + [(f"s{k + 1}", s)
                                                          for k, s in enumerate(sources)]:
        (root / "tt" / sub).mkdir(parents=True, exist_ok=True)
        sf.write(root / "tt" / sub / "m1.wav", audio.astype(np.float32), SR, subtype="FLOAT")
        if sub != "mix":
            row[f"source_{sub[1:]}_path"] = f"tt/{sub}/m1.wav"
    pd.DataFrame([row]).to_csv(root / "tt.csv", index=False)
    return root / "tt.csv"


def test_internals_figure_renders(tiny_exp, tmp_path, repo_root):
    csv = _tiny_bsd(tmp_path)
    png = make_figure(tiny_exp, max_s=1.0, csv=csv, mixture_id="m1")
    assert png == tiny_exp / "figures" / "internals_m1.png"
    assert png.stat().st_size > 20_000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    wav = tmp_path / "BSD-2mix" / "tt" / "mix" / "m1.wav"
    assert internals_figure.main(["--conf", str(repo_root / "conf.yml"), "--exp_dir",
                                  str(tiny_exp), "--wav", str(wav),
                                  "--out", str(tmp_path / "wav.png")]) == 0
    assert (tmp_path / "wav.png").stat().st_size > 20_000
    with pytest.raises(KeyError, match="no mixture 'nope'"):
        make_figure(tiny_exp, max_s=1.0, csv=csv, mixture_id="nope")


def test_plot_internals_with_three_sources(tmp_path):
    torch.manual_seed(0)
    model = ConvTasNet(**{**TINY, "n_src": 3}).eval()
    references = np.random.default_rng(0).standard_normal((3, SR // 2)).astype(np.float32) * 0.1
    png = plot_internals(model, references.sum(0), references, tmp_path / "three.png")
    assert png.stat().st_size > 20_000
