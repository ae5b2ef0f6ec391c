"""fdfast finetune / knn / linprobe: the recipe's numbers (layer decay, normalisation, head init), exact resume,
recipes, the bad inputs (one line, exit 2, nothing written), and the probes' maths. Tiny models, 32 px."""
import json
import math
import re

import numpy as np
import pytest
import torch
from PIL import Image

from fdfast.checkpoint import STUDENT_META_KEY
from fdfast.cli import main
from fdfast.config import ModelConfig
from fdfast.errors import FDFastError
from fdfast.finetune import load_finetune_config
from fdfast.finetune.config import FinetuneConfig
from fdfast.finetune.data import build_transforms
from fdfast.finetune.task import build_optimizer
from fdfast.finetune.model import build_classifier, resolve_model
from fdfast.io import atomic_save_safetensors

DEPTH = 3
TINY = dict(depth=DEPTH, embed_dim=32, num_heads=2)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FDFAST_CACHE", str(tmp_path / "cache"))  # feature and file-check caches per test


def _student_cfg(img_size=32) -> dict:
    return dict(ModelConfig(arch="vit", size="tiny", patch_size=8, img_size=img_size, drop_path=0.0,
                            pos_bias="shared", kwargs=dict(TINY)).__dict__)


@pytest.fixture(scope="module")
def student_run(tmp_path_factory):
    """An FD run dir: config.yaml (CLIP teacher: its mean/std must reach fine-tuning) + student.safetensors."""
    from fdfast.models.student import build_student
    run = tmp_path_factory.mktemp("run")
    cfg = _student_cfg()
    torch.manual_seed(3)
    student = build_student(ModelConfig(**cfg))
    with torch.no_grad():  # a non-zero shared table, so the per-block copies are visible; a final norm that is not
        student.rel_pos_bias.relative_position_bias_table.normal_()  # LayerNorm(1, 0), so a new fc_norm is too
        student.norm.weight.uniform_(2, 3)
    atomic_save_safetensors(student.state_dict(), run / "student.safetensors",
                            metadata={STUDENT_META_KEY: json.dumps(cfg)})
    (run / "config.yaml").write_text("teacher:\n  name: clip-vit-b16\nmodel:\n  img_size: 32\n")
    return run


def _colour_set(root, classes=("a", "b", "c"), per_class=4, seed=0):
    """Class folders of 32x32 PNGs whose colour says the class (learnable), with pixel noise."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            base = np.zeros((32, 32, 3)) + 60
            base[..., c % 3] = 200
            img = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / name / f"{i}.png")
    return root


@pytest.fixture
def data_dir(tmp_path):
    root = tmp_path / "data"
    _colour_set(root / "train", per_class=4, seed=0)
    _colour_set(root / "val", per_class=2, seed=1)
    return root


def _cfg(data_dir, **over) -> FinetuneConfig:
    d = {"data": {"path": str(data_dir), "batch_size": 4, "num_workers": 0, "img_size": 32},
         "optim": {"epochs": 2, "warmup_epochs": 1, "base_lr": 0.05}, "runtime": {"progress": False}}
    for k, v in over.items():
        section, key = k.split("__")
        d.setdefault(section, {})[key] = v
    return FinetuneConfig.from_dict(d)


# ---- the recipe's numbers ------------------------------------------------------------------------------------

def test_layer_decay_scale_per_block_matches_method(student_run, data_dir):
    """METHOD.md: block k of L gets decay^(L+1-(k+1)), embeddings decay^(L+1), head 1 -- applied ONCE to the lr."""
    decay = 0.5
    cfg = _cfg(data_dir, model__layer_decay=decay)
    clf = build_classifier(resolve_model(str(student_run)), 3, 32)
    optimizer, scheduler = build_optimizer(clf.model, cfg, steps_per_epoch=10)
    L = DEPTH

    def expected(name):
        m = re.match(r"blocks\.(\d+)\.", name)
        if m:
            return decay ** (L + 1 - (int(m.group(1)) + 1))
        if name.startswith(("patch_embed", "cls_token", "pos_embed", "rel_pos_bias")):
            return decay ** (L + 1)
        assert name.startswith(("head", "fc_norm")), name
        return 1.0

    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    names = dict(clf.model.named_parameters())
    assert any(n.startswith("blocks.2.") for n in names) and "cls_token" in names
    scheduler.step_update(12)  # past warmup: the cosine part
    head_lr = group_of[id(names["head.weight"])]["lr"]
    base = scheduler._get_lr(12)[0]
    assert head_lr == pytest.approx(base, rel=1e-12)
    for name, p in names.items():
        g = group_of[id(p)]
        assert g["lr_scale"] == pytest.approx(expected(name), rel=1e-12), name
        assert g["lr"] == pytest.approx(base * expected(name), rel=1e-12), name  # scale applied exactly once
        no_decay = p.ndim <= 1 or name == "cls_token" or name.endswith("relative_position_bias_table")  # tokens, tables
        assert g["weight_decay"] == (0.0 if no_decay else cfg.optim.weight_decay), name


def test_eval_normalisation_equals_train_normalisation(student_run, data_dir):
    """The run's teacher (CLIP) mean/std normalise training AND evaluation views: equal on an un-augmented image."""
    from timm.data import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    clf = build_classifier(resolve_model(str(student_run)), 3, 32)
    assert clf.mean == pytest.approx(OPENAI_CLIP_MEAN) and clf.std == pytest.approx(OPENAI_CLIP_STD)
    cfg = _cfg(data_dir, data__scale=[1.0, 1.0], data__hflip=0.0, data__auto_augment=None, data__reprob=0.0,
               data__crop_pct=1.0)
    train_tf, eval_tf = build_transforms(cfg.data, 32, clf.mean, clf.std)
    img = Image.fromarray(np.full((32, 32, 3), (10, 128, 250), np.uint8))
    a, b = train_tf(img), eval_tf(img)
    assert torch.allclose(a, b, atol=1e-6)
    want = (torch.tensor([10, 128, 250]) / 255.0 - torch.tensor(OPENAI_CLIP_MEAN)) / torch.tensor(OPENAI_CLIP_STD)
    assert torch.allclose(b[:, 5, 5], want.float(), atol=1e-5)


def test_head_init_and_backbone_weights(student_run):
    """Head = trunc_normal(0.02) x 0.001, bias 0; a new fc_norm = LayerNorm(1, 0) where the final norm was (the
    published FD / BEiT / MAE code, timm --gp avg); every block gets a copy of the shared relative position table;
    the other weights are the student's."""
    from safetensors.torch import load_file
    sd = load_file(str(student_run / "student.safetensors"))
    clf = build_classifier(resolve_model(str(student_run)), 3, 32, head_init_scale=0.001)
    m = clf.model
    w = m.head.weight.detach()
    assert w.shape == (3, 32) and torch.count_nonzero(m.head.bias) == 0
    assert 0.4 * 2e-5 < w.std().item() < 1.6 * 2e-5 and w.abs().max().item() <= 2 * 0.02 * 0.001 + 1e-12
    assert isinstance(m.norm, torch.nn.Identity)
    assert torch.equal(m.fc_norm.weight, torch.ones(32)) and torch.equal(m.fc_norm.bias, torch.zeros(32))
    table = sd["rel_pos_bias.relative_position_bias_table"]
    for blk in m.blocks:
        assert torch.equal(blk.attn.relative_position_bias_table, table)
    assert torch.equal(m.blocks[1].mlp.fc1.weight, sd["blocks.1.mlp.fc1.weight"])
    assert m.global_pool == "avg"


def test_finetuned_classifier_and_swin_keep_their_norms():
    """A fine-tuned classifier as MODEL loads its own fc_norm; a Swin (no pooled fc_norm) keeps its final norm."""
    import timm
    from fdfast.finetune.model import Backbone
    vit = dict(embed_dim=16, depth=1, num_heads=2, img_size=32, patch_size=8, global_pool="avg", num_classes=3)
    src = timm.create_model("vit_tiny_patch16_224", **vit)
    with torch.no_grad():
        src.fc_norm.weight.uniform_(2, 3)
    clf = build_classifier(Backbone("vit_tiny_patch16_224", {k: v for k, v in vit.items() if k != "num_classes"},
                                    src.state_dict(), (0.5,) * 3, (0.5,) * 3, 32, False, "ft"), 5, 32)
    assert torch.equal(clf.model.fc_norm.weight, src.fc_norm.weight) and clf.model.head.out_features == 5
    swin = dict(embed_dim=16, depths=(1, 1), num_heads=(2, 2), window_size=4, img_size=32, patch_size=4)
    src = timm.create_model("swinv2_tiny_window8_256", num_classes=0, **swin)
    with torch.no_grad():
        src.norm.weight.uniform_(2, 3)
    clf = build_classifier(Backbone("swinv2_tiny_window8_256", swin, src.state_dict(), (0.5,) * 3, (0.5,) * 3, 32,
                                    True, "swin"), 3, 32)
    assert torch.equal(clf.model.norm.weight, src.norm.weight) and clf.model.head.fc.out_features == 3


def test_randaugment_full_magnitude_posterize_runs(data_dir):
    """m9 + mstd 0.5 reaches magnitude 10, where timm asks Pillow to posterize to 0 bits (an error in Pillow >= 10)."""
    cfg = _cfg(data_dir)
    train_tf, _ = build_transforms(cfg.data, 32, (0.5,) * 3, (0.5,) * 3)
    ops = [op for t in train_tf.transforms for op in getattr(t, "ops", []) if op.name == "PosterizeIncreasing"]
    assert len(ops) == 1
    img = Image.fromarray(np.full((32, 32, 3), 200, np.uint8))
    out = ops[0].aug_fn(img, 0)  # what magnitude 10 gives
    assert np.asarray(out).max() == 128  # 1 bit kept: 200 -> 128


# ---- exact resume ------------------------------------------------------------------------------------------------

def _rows(run):
    drop = {"img_per_s", "elapsed_s"}
    return [{k: v for k, v in json.loads(x).items() if k not in drop} for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_exact_resume_of_a_finetune(student_run, data_dir, tmp_path, monkeypatch):
    """A run killed right after committing epoch 1 and resumed equals an uninterrupted run, bit for bit."""
    from safetensors.torch import load_file
    from fdfast.checkpointer import Checkpointer
    from fdfast.finetune import finetune
    over = dict(data__mixup=0.8, data__cutmix=1.0, model__drop_path=0.1, optim__ema=True, optim__ema_decay=0.5)
    straight = tmp_path / "straight"
    finetune(_cfg(data_dir, **over), str(student_run), straight)
    half = tmp_path / "half"
    save = Checkpointer.save

    def crash_after_commit(self, step, run, state, meta):
        save(self, step, run, state, meta)
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(Checkpointer, "save", crash_after_commit)  # killed right after committing epoch 1
    with pytest.raises(KeyboardInterrupt):
        finetune(_cfg(data_dir, **over), str(student_run), half)
    monkeypatch.setattr(Checkpointer, "save", save)
    resumed = finetune(_cfg(data_dir, **over), str(student_run), half, resume="auto")
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(half / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _rows(straight) == _rows(half) and len(_rows(half)) == 2
    summary = json.loads((straight / "summary.json").read_text())
    assert summary["top1"] == resumed["top1"] and summary["best_epoch"] == resumed["best_epoch"]
    steps_per_epoch = 3  # 12 training images, batch 4
    assert (half / "checkpoints" / f"step-{2 * steps_per_epoch}" / "COMMITTED").is_file()


def test_finetuned_model_is_a_timm_export_knn_reads(student_run, data_dir, tmp_path):
    """best.safetensors recreates its classifier strictly, with its classes and normalisation."""
    from fdfast.finetune import finetune
    from fdfast.models.export import load_timm_export
    out = tmp_path / "ft"
    s = finetune(_cfg(data_dir, optim__epochs=1), str(student_run), out)
    model = load_timm_export(out / "best.safetensors")
    assert model.head.out_features == 3 and s["classes"] == 3 and 0 <= s["top1"] <= 100
    assert main(["knn", str(out / "best.safetensors"), "--data", str(data_dir), "--k", "2"]) == 0


# ---- recipes -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, epochs, warmup, lr, decay, drop_path", [
    ("ft_clip_b16", 100, 20, 1.25e-3, 0.6, 0.3),
    ("ft_dino_b16", 100, 20, 1.5e-3, 0.6, 0.2),
    ("ft_deit_b16", 100, 20, 1.25e-3, 0.65, 0.3),
    ("ft_clip_l14", 50, 5, 2.5e-4, 0.75, 0.4),
    ("ft_esvit_swin_b", 100, 20, 1.25e-3, 0.8, 0.4),
    ("ft_mae_b16", 100, 20, 1.25e-3, 0.65, 0.3),
])
def test_recipes_carry_method_values(name, epochs, warmup, lr, decay, drop_path):
    c = load_finetune_config(name)
    assert (c.optim.epochs, c.optim.warmup_epochs, c.optim.base_lr) == (epochs, warmup, lr)
    assert (c.model.layer_decay, c.model.drop_path) == (decay, drop_path)
    assert (c.optim.weight_decay, c.optim.clip_grad, c.optim.ema, c.model.head_init_scale) == (0.05, 5.0, False, 0.001)
    d = c.data
    assert (d.mixup, d.cutmix, d.label_smoothing, d.auto_augment, d.reprob) == \
        (0.8, 1.0, 0.1, "rand-m9-mstd0.5-inc1", 0.25)


def test_recipe_errors():
    assert load_finetune_config("ft_demo").recipe == "ft_demo"
    with pytest.raises(FDFastError, match="FD training recipe"):
        load_finetune_config("demo")
    with pytest.raises(FDFastError, match="optim.epoch"):
        load_finetune_config("ft_demo", {"optim.epoch": 3})
    with pytest.raises(FDFastError, match="data.remode must be one of"):
        load_finetune_config("ft_demo", {"data.remode": "pixels"})
    with pytest.raises(FDFastError, match="even"):
        load_finetune_config("ft_demo", {"data.batch_size": 7, "data.mixup": 0.8})


# ---- bad input: one line, exit 2, nothing written ----------------------------------------------------------------

def _bad(capsys, argv, out, match):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(match, err), err
    assert not out.exists()


def test_bad_data_without_class_subfolders(student_run, tmp_path, capsys):
    flat = tmp_path / "flat"
    flat.mkdir()
    for i in range(3):
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(flat / f"{i}.png")
    out = tmp_path / "out"
    _bad(capsys, ["finetune", str(student_run), "--data", str(flat), "--val", str(flat), "--out", str(out)], out,
         "one subfolder per class")
    _bad(capsys, ["finetune", str(student_run), "--data", str(flat), "--out", str(out)], out, "train/ and val/")
    _bad(capsys, ["knn", str(student_run), "--data", str(flat), "--val", str(flat), "--out", str(out)], out,
         "one subfolder per class")


def test_bad_val_classes_missing_from_train(student_run, tmp_path, capsys):
    _colour_set(tmp_path / "d" / "train", classes=("a", "b"))
    _colour_set(tmp_path / "d" / "val", classes=("a", "b", "zebra"))
    out = tmp_path / "out"
    _bad(capsys, ["finetune", str(student_run), "--data", str(tmp_path / "d"), "--out", str(out)], out,
         r"\['zebra'\].*missing from the training set")
    _bad(capsys, ["linprobe", str(student_run), "--data", str(tmp_path / "d"), "--out", str(out)], out, "zebra")


def test_bad_patch_grid_for_image_size(student_run, data_dir, tmp_path, capsys):
    out = tmp_path / "out"
    _bad(capsys, ["finetune", str(student_run), "--data", str(data_dir), "--img-size", "36", "--out", str(out)], out,
         "8 px patches.*36 px.*multiple of 8")
    _bad(capsys, ["finetune", str(student_run), "--data", str(data_dir), "--img-size", "48", "--out", str(out)], out,
         "trained at 32 px")
    _bad(capsys, ["knn", "teacher:vit_tiny_patch16_224@" + str(student_run / "student.safetensors"), "--data",
                  str(data_dir), "--img-size", "40", "--out", str(out)], out, "16 px patches")


def test_bad_checkpoint_that_is_not_a_model(data_dir, tmp_path, capsys):
    from safetensors.torch import save_file
    state = tmp_path / "train_state.pt"
    torch.save({"step": 3, "optimizer": {}}, state)
    plain = tmp_path / "tensors.safetensors"
    save_file({"x": torch.zeros(2)}, str(plain))
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    out = tmp_path / "out"
    for bad in (state, plain, junk, tmp_path / "no_such_model"):
        _bad(capsys, ["finetune", str(bad), "--data", str(data_dir), "--out", str(out)], out, str(bad.name))
    _bad(capsys, ["knn", str(plain), "--data", str(data_dir), "--out", str(out)], out, "tensors.safetensors")


# ---- the probes' maths -------------------------------------------------------------------------------------------

def _blobs(n, k=3, d=6, seed=0, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(k, d, generator=g) * 3
    y = torch.arange(n) % k
    return centres[y] * torch.rand(d, generator=g) * 4 + spread * torch.randn(n, d, generator=g) + 5, y


def test_exact_linprobe_equals_bn_without_affine_plus_linear():
    """Full-batch training of BatchNorm1d(affine=False) + Linear with the same L2 penalty converges to the solver's
    optimum: the same head weights and logits (the claim evaluate.py's docstring makes)."""
    from fdfast.evaluate import BN_EPS, fit_linear, standardise
    x, y = _blobs(90, spread=2.0)
    wd = 1e-2
    z, = standardise(x)
    w, b = fit_linear(z, y, 3, wd, max_iter=1000, dtype=torch.float64)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.BatchNorm1d(6, affine=False, eps=BN_EPS), torch.nn.Linear(6, 3)).double()
    opt = torch.optim.LBFGS(net.parameters(), max_iter=1000, tolerance_grad=1e-10, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(net(x.double()), y) + 0.5 * wd * (net[1].weight ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        want = net(x.double()).float()  # train mode: BN normalises with the batch (= training set) statistics
    got = z @ w.T + b
    # the bias is unpenalised and softmax ignores a shift shared by all classes: compare log-probabilities
    assert torch.allclose(got.log_softmax(1), want.log_softmax(1), atol=1e-4), (got - want).abs().max()
    assert torch.allclose(w, net[1].weight.float(), atol=1e-4)
    assert torch.allclose(b - b.mean(), (net[1].bias - net[1].bias.mean()).float(), atol=1e-4)


def test_knn_and_linprobe_on_separable_features():
    from fdfast.evaluate import Features, knn_top1, linear_probe
    x, y = _blobs(120, spread=0.1)
    xv, yv = _blobs(30, seed=0, spread=0.1)
    f = Features(x, y, xv, yv, ["a", "b", "c"], "blobs", 0)
    assert knn_top1(f, k=5) == 100.0
    r = linear_probe(f)
    assert r["top1"] == 100.0 and r["top5"] == 100.0
    # k=1 is the nearest neighbour's label: flip it and the answer flips
    f1 = Features(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1]), torch.tensor([[0.9, 0.1]]),
                  torch.tensor([1]), ["a", "b"], "two", 0)
    assert knn_top1(f1, k=1) == 0.0
    f1.val_labels = torch.tensor([0])
    assert knn_top1(f1, k=1) == 100.0


def test_knn_and_linprobe_cli(student_run, data_dir, tmp_path):
    """Features are cached: the second command reuses them; results land in --out."""
    out = tmp_path / "knn.json"
    assert main(["knn", str(student_run), "--data", str(data_dir), "--k", "3", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["train_images"] == 12 and r["val_images"] == 6 and 0 <= r["top1"] <= 100
    cached = list((tmp_path / "cache" / "features").glob("*.safetensors"))
    assert len(cached) == 1
    out2 = tmp_path / "lp.json"
    assert main(["linprobe", str(student_run), "--data", str(data_dir), "--out", str(out2)]) == 0
    assert list((tmp_path / "cache" / "features").glob("*.safetensors")) == cached
    assert not math.isnan(json.loads(out2.read_text())["top1"])


# ---- the demo-labelled set -----------------------------------------------------------------------------------------

def test_demo_labelled_split_is_disjoint_and_fixed():
    labelled = pytest.importorskip("fdfast.demo.labelled")
    try:
        images, labels = labelled._read_arrays()
    except FDFastError as e:
        pytest.skip(str(e))
    parts = labelled.split(images, labels)
    train = {h for h, _, _ in parts["train"]}
    val = {h for h, _, _ in parts["val"]}
    assert not train & val and len(train) == len(parts["train"]) and len(val) == len(parts["val"])
    assert (len(train), len(val)) == (7775, 1941)  # 9,716 distinct images of the 10,000
    per_class = np.bincount([c for _, c, _ in parts["val"]], minlength=10)
    assert per_class.min() >= 160 and per_class.max() <= 200  # 20% of each class's distinct images
    assert [h for h, _, _ in parts["val"]] == [h for h, _, _ in labelled.split(images, labels)["val"]]


def test_a_second_process_on_the_run_dir_stops(student_run, data_dir, tmp_path, capsys):
    from fdfast.io import run_dir_lock
    out = tmp_path / "busy"
    with run_dir_lock(out, "fdfast finetune"):
        assert main(["finetune", str(student_run), "--data", str(data_dir), "--out", str(out), "--epochs", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "in use" in err
    assert sorted(p.name for p in out.iterdir()) == [".lock"]


@pytest.mark.parametrize("warmup_prefix", [False, True])
def test_cosine_schedule_warms_up_then_ends_at_min_lr(warmup_prefix):
    """Both shapes reach the peak after the warmup and min_lr at the end of the run: a prefixed warmup shifts the
    cosine, it does not cut it short (the fine-tuning schedule once ended at 4.6e-5 of a 1e-3 peak, issue 26)."""
    from fdfast.run import cosine_schedule
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    total, warmup = 30, 4
    sched = cosine_schedule(opt, total, warmup, min_lr=0.0, warmup_lr=1e-5, warmup_prefix=warmup_prefix)
    lrs = []
    for n in range(total + 1):  # step_update(n) sets the lr of step n + 1; n = total is just past the last step
        sched.step_update(n)
        lrs.append(opt.param_groups[0]["lr"])
    assert lrs[0] == pytest.approx(1e-5) and lrs[total] == pytest.approx(0.0, abs=1e-12)
    assert all(a < b for a, b in zip(lrs[:warmup], lrs[1:warmup + 1]))  # rising warmup
    assert all(a >= b for a, b in zip(lrs[warmup + 1:], lrs[warmup + 2:]))  # then falling to the end
    # the peak: 1e-3 where the cosine starts after the warmup; inside it (timm), the cosine's value at step `warmup`
    peak = 1e-3 if warmup_prefix else 0.5e-3 * (1 + math.cos(math.pi * warmup / total))
    assert max(lrs) == lrs[warmup] == pytest.approx(peak, rel=1e-6)


@pytest.mark.parametrize("train_interp", [None, "bilinear", "random"])
def test_train_interpolation_is_its_own_setting(train_interp):
    """data.train_interpolation (timm train.py's --train-interpolation) sets the training crop and RandAugment's
    geometric ops; evaluation keeps data.interpolation; unset, training uses data.interpolation too."""
    from timm.data.transforms import RandomResizedCropAndInterpolation
    from torchvision.transforms import InterpolationMode
    cfg = load_finetune_config("ft_demo", {"data.train_interpolation": train_interp} if train_interp else {})
    train, evaluation = build_transforms(cfg.data, 32, (0.5,) * 3, (0.5,) * 3)
    crop = next(t for t in train.transforms if isinstance(t, RandomResizedCropAndInterpolation))
    want = {None: (InterpolationMode.BICUBIC,), "bilinear": (InterpolationMode.BILINEAR,),
            "random": (InterpolationMode.BILINEAR, InterpolationMode.BICUBIC)}[train_interp]
    assert tuple(crop.interpolation) == want if train_interp == "random" else crop.interpolation == want[0]
    resize = evaluation.transforms[0]
    assert resize.interpolation == InterpolationMode.BICUBIC
