import numpy as np
import pytest
import torch

from retinalens.errors import RetinaLensError
from retinalens.models.heads import HeadConfig
from retinalens.train.trainer import TrainConfig, class_weights_for, train_head, write_curves

SHAPE = (16, 3, 3)  # small (C, H, W) maps keep these tests fast


def separable(n: int, seed: int, noise: float = 1.0):
    """Class k shifts channel k of every position: learnable, but noisy enough to overfit."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, n)
    x = rng.normal(0, noise, (n, SHAPE[1], SHAPE[2], SHAPE[0])).astype(np.float32)
    x[np.arange(n), :, :, y] += 1.5
    return x.astype(np.float16), y


def fit(cfg: TrainConfig, seed_data: int = 0, head: str = "conv", **kw):
    xt, yt = separable(160, seed_data)
    xv, yv = separable(60, seed_data + 100)
    if head == "linear":
        xt, xv = xt.astype(np.float32).mean((1, 2)), xv.astype(np.float32).mean((1, 2))
    return train_head(xt, yt, xv, yv, num_classes=4, feature_shape=SHAPE, cfg=cfg, progress=False, **kw)


def test_same_seed_same_weights_other_seed_differs():
    a = fit(TrainConfig(epochs=6, seed=3))
    b = fit(TrainConfig(epochs=6, seed=3))
    c = fit(TrainConfig(epochs=6, seed=4))
    for k, v in a.head.state_dict().items():
        assert torch.equal(v, b.head.state_dict()[k]), k
    assert any(not torch.equal(v, c.head.state_dict()[k]) for k, v in a.head.state_dict().items())


def test_keeps_the_best_validation_epoch():
    r = fit(TrainConfig(epochs=25, early_stopping=0, seed=0))
    losses = [h["val_loss"] for h in r.history]
    assert r.best_epoch == int(np.argmin(losses)) + 1
    assert r.val_metrics["val_loss"] == pytest.approx(min(losses))
    # the returned head really is that epoch's weights: recompute its validation loss
    xv, yv = separable(60, 100)
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(r.head(torch.from_numpy(xv).float()), torch.from_numpy(yv).long())
    assert float(loss) == pytest.approx(min(losses), rel=1e-5)


def test_monitor_val_acc_picks_the_most_accurate_epoch():
    r = fit(TrainConfig(epochs=15, early_stopping=0, monitor="val_acc"))
    accs = [h["val_acc"] for h in r.history]
    assert r.history[r.best_epoch - 1]["val_acc"] == max(accs)
    assert r.best_epoch == accs.index(max(accs)) + 1  # the first epoch that reached it


def test_lr_halves_on_plateau_and_respects_the_floor():
    # random labels: validation cannot improve for long, so the schedule must step down to the floor
    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 3, 3, 16)).astype(np.float16)
    y = rng.integers(0, 4, 80)
    cfg = TrainConfig(epochs=40, lr_patience=1, early_stopping=0, lr=1e-3, min_lr=5e-5)
    r = train_head(x, y, x[:40], rng.integers(0, 4, 40), num_classes=4, feature_shape=SHAPE, cfg=cfg, progress=False)
    lrs = [h["lr"] for h in r.history]
    assert all(b <= a for a, b in zip(lrs, lrs[1:]))
    assert min(lrs) == pytest.approx(5e-5)
    assert any(b == pytest.approx(a / 2) for a, b in zip(lrs, lrs[1:]))


def test_early_stopping_stops_before_the_epoch_budget():
    r = fit(TrainConfig(epochs=200, early_stopping=3))
    assert len(r.history) < 200
    assert len(r.history) - r.best_epoch == 3


def test_linear_head_learns_separable_data():
    r = fit(TrainConfig(head=HeadConfig(kind="linear", dropout=0.0), epochs=40, lr=1e-2), head="linear")
    assert r.val_metrics["val_acc"] > 0.9


def test_class_weights_are_inverse_frequency():
    w = class_weights_for(torch.tensor([0, 0, 0, 1]), 2)
    assert w[1] / w[0] == pytest.approx(3.0)


def test_empty_validation_is_a_clear_error():
    x, y = separable(10, 0)
    with pytest.raises(RetinaLensError):
        train_head(x, y, x[:0], y[:0], num_classes=4, feature_shape=SHAPE, cfg=TrainConfig(epochs=1), progress=False)


def test_curves_csv_and_png(tmp_path):
    r = fit(TrainConfig(epochs=3))
    write_curves(r, tmp_path)
    lines = (tmp_path / "curves.csv").read_text().splitlines()
    assert lines[0] == "epoch,train_loss,train_acc,val_loss,val_acc,lr"
    assert len(lines) == 1 + len(r.history)
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("n_classes", [2, 4])
def test_logistic_head_is_sklearn_folded_into_a_linear_layer(n_classes):
    """The folded head (standardisation inside its weights) gives sklearn's own probabilities."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from retinalens.models.heads import head_probabilities
    from retinalens.train.trainer import fit_logistic_head

    rng = np.random.default_rng(1)
    y = rng.integers(0, n_classes, 200)
    x = (rng.normal(size=(200, 16)) * rng.uniform(0.1, 10, 16) + rng.normal(0, 5, 16)).astype(np.float32)
    x[np.arange(200), y] += 3.0
    r = fit_logistic_head(x[:150], y[:150], x[150:], y[150:], num_classes=n_classes, feature_shape=(16, 1, 1), cs=(0.1,))
    scaler = StandardScaler().fit(x[:150])
    want = LogisticRegression(C=0.1, max_iter=3000, random_state=0).fit(scaler.transform(x[:150]), y[:150])
    np.testing.assert_allclose(head_probabilities(r.head, x[150:]), want.predict_proba(scaler.transform(x[150:])), atol=1e-4)
    assert r.val_metrics["val_acc"] == pytest.approx(float((want.predict(scaler.transform(x[150:])) == y[150:]).mean()))
    assert not r.has_curves


def test_logistic_head_picks_c_on_validation():
    from retinalens.train.trainer import fit_logistic_head

    xt, yt = separable(160, 0)
    xv, yv = separable(60, 100)
    pt, pv = xt.astype(np.float32).mean((1, 2)), xv.astype(np.float32).mean((1, 2))
    results = {c: fit_logistic_head(pt, yt, pv, yv, num_classes=4, feature_shape=SHAPE, cs=(c,)).val_metrics
               for c in (0.001, 0.1, 10.0)}
    best = fit_logistic_head(pt, yt, pv, yv, num_classes=4, feature_shape=SHAPE, cs=(0.001, 0.1, 10.0)).val_metrics
    top = max(results.values(), key=lambda m: (m["val_acc"], -m["val_loss"]))
    assert best["C"] == top["C"] and best["val_acc"] == top["val_acc"]


@pytest.mark.parametrize("bad", [{"epochs": 0}, {"batch_size": 0}, {"lr": 0.0}, {"monitor": "val_f1"}])
def test_bad_training_options_are_clear_errors(bad):
    with pytest.raises(RetinaLensError):
        fit(TrainConfig(**bad))
