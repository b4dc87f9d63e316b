"""Every registered zoo model against timm's model contract, the paper numbers and the official key lists.

Paper numbers live in tests/data/paper/<family>.json (the table the model cards are generated from);
official checkpoint layouts in tests/data/official_keys/<model>.json (names and shapes only).
"""
import inspect
import json
import pathlib
import re
import sys

import pytest
import timm
import torch
import torch.nn.functional as F
from fvcore.nn import FlopCountAnalysis

import vmamba_kernels
import vmamba_zoo  # noqa: F401  (registers the models)

DATA = pathlib.Path(__file__).resolve().parents[1] / "data"

EXPECTED_MODELS = [
    "plainmamba_l1", "plainmamba_l2", "plainmamba_l3",
    "efficientvmamba_tiny", "efficientvmamba_small", "efficientvmamba_base",
    "spatialmamba_tiny", "spatialmamba_small", "spatialmamba_base",
    "groupmamba_tiny", "groupmamba_small", "groupmamba_base",
    "vim2_tiny", "vim2_small", "vim2_base",
    "vmamba_tiny_s1l8", "vmamba_small_s1l20", "vmamba_base_s1l20", "vmamba_tiny_mhs",
]
# The smallest model of each family (and each scan strategy) for the slower checks.
REPRESENTATIVES = ["plainmamba_l1", "efficientvmamba_tiny", "spatialmamba_tiny", "groupmamba_tiny",
                   "vim2_tiny", "vmamba_tiny_s1l8", "vmamba_tiny_mhs"]
FAMILY_MODULES = ["plainmamba", "efficientvmamba", "spatialmamba", "groupmamba", "mambamixer", "vim2", "vmamba"]


def _zoo_models():
    return sorted(timm.list_models(module=FAMILY_MODULES))


PAPER = {}
for _path in sorted((DATA / "paper").glob("*.json")):
    PAPER.update(json.loads(_path.read_text()))


def _module_of(model):
    return sys.modules[type(model).__module__]


def _create(name, **kwargs):
    torch.manual_seed(0)
    return timm.create_model(name, **kwargs)


def test_every_expected_model_is_registered():
    assert sorted(EXPECTED_MODELS) == _zoo_models()


def test_the_import_hint_knows_every_zoo_family_and_no_timm_model():
    """vmamba_zoo_timm_hint (imported at interpreter start, before torch) knows the zoo by its name prefixes."""
    from vmamba_zoo_timm_hint import ZOO_PREFIXES, hint
    zoo = _zoo_models()
    assert all(hint(name) for name in zoo) and hint(f"{zoo[0]}.some_tag")
    assert all(any(name.startswith(prefix) for name in zoo) for prefix in ZOO_PREFIXES)
    timm_names = set(timm.list_models()) - set(zoo)
    assert not [name for name in timm_names if hint(name)]


@pytest.mark.parametrize("name", EXPECTED_MODELS)
def test_pretrained_cfg(name):
    cfg = timm.get_pretrained_cfg(name).to_dict()
    for key in ("input_size", "crop_pct", "mean", "std", "interpolation", "first_conv", "classifier", "license"):
        assert cfg.get(key) is not None, key
    assert cfg.get("paper_ids") or cfg.get("paper_name"), "paper reference"
    model = timm.create_model(name, pretrained=False)
    modules = dict(model.named_modules())
    assert cfg["first_conv"] in modules and isinstance(modules[cfg["first_conv"]], torch.nn.Conv2d)
    classifiers = [cfg["classifier"]] if isinstance(cfg["classifier"], str) else cfg["classifier"]
    for classifier in classifiers:
        assert classifier in modules, classifier


@pytest.mark.parametrize("name", EXPECTED_MODELS)
def test_forward_params_and_flops_match_the_paper_and_an_empty_batch_gives_empty_outputs(name):
    paper = PAPER[name]
    model = _create(name).eval()
    size = timm.get_pretrained_cfg(name).input_size
    x = torch.randn(1, *size)
    with torch.no_grad():
        logits = model(x)
        features = model.forward_features(x)
        final, intermediates = model.forward_intermediates(x)
    assert logits.shape == (1, model.num_classes) and torch.isfinite(logits).all()
    # Batch 0 (checked here, where each registered model is built anyway): every output is the batch-1 one's
    # shape with 0 images.
    with torch.no_grad():
        empty = torch.empty(0, *size)
        assert model(empty).shape == (0, model.num_classes)
        assert model.forward_features(empty).shape == (0, *features.shape[1:])
        empty_final, empty_intermediates = model.forward_intermediates(empty)
    assert empty_final.shape == (0, *final.shape[1:])
    assert [t.shape for t in empty_intermediates] == [(0, *t.shape[1:]) for t in intermediates]

    params = sum(p.numel() for p in model.parameters())
    if paper.get("params_exclude_head"):
        params -= sum(p.numel() for p in model.get_classifier().parameters())
    if paper.get("params_m") is not None:
        tolerance = paper.get("params_rel_tol", 0.01)  # wider only where the paper cannot be met; see "source"
        assert abs(params / 1e6 - paper["params_m"]) <= tolerance * paper["params_m"], f"{params / 1e6:.3f}M"
    if paper.get("gflops") is not None:
        x224 = torch.randn(1, 3, 224, 224)
        flops = FlopCountAnalysis(model, x224).set_op_handle(**vmamba_kernels.fvcore_handles())
        flops.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        gflops = flops.total() / 1e9
        assert abs(gflops - paper["gflops"]) <= 0.03 * paper["gflops"], f"{gflops:.3f}G"


@pytest.mark.parametrize("name", EXPECTED_MODELS)
def test_official_checkpoint_keys_convert_and_load_strictly(name):
    path = DATA / "official_keys" / f"{name}.json"
    if not path.exists():
        assert name.startswith("vim2_") or name == "vmamba_tiny_mhs", f"official key list missing for {name}"
        return  # no official checkpoint exists for these
    keys = json.loads(path.read_text())["keys"]
    model = _create(name)
    official = {k: torch.randn(shape) if shape else torch.randn(()) for k, shape in keys.items()}
    converted = _module_of(model).checkpoint_filter_fn({"model": official}, model)
    model.load_state_dict(converted, strict=True)


@pytest.mark.parametrize("name", REPRESENTATIVES)
def test_pretrained_loads_a_local_file(name, tmp_path):
    source = _create(name)
    path = tmp_path / "weights.pth"
    torch.save({"model": {k: v + 1 for k, v in source.state_dict().items()}}, path)
    loaded = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    for key, value in source.state_dict().items():
        if value.is_floating_point():
            torch.testing.assert_close(loaded.state_dict()[key], value + 1, msg=key)


def _same_weights(model, features):
    """The full model's weights under the feature extractor's names (a getter wraps it as `model.`)."""
    source = model.state_dict()
    return {k: source[k[len("model."):] if k.startswith("model.") and k not in source else k]
            for k in features.state_dict()}


@pytest.mark.parametrize("name", REPRESENTATIVES)
def test_features_match_intermediates_on_a_non_square_input(name):
    x = torch.randn(2, 3, 128, 96)
    model = _create(name).eval()
    features = _create(name, features_only=True).eval()
    features.load_state_dict(_same_weights(model, features), strict=True)
    info = features.feature_info
    with torch.no_grad():
        maps = features(x)
        inter = model.forward_intermediates(x, indices=list(info.out_indices), intermediates_only=True)
    assert len(maps) == len(info.channels()) == len(inter)
    for m, i, chs, red in zip(maps, inter, info.channels(), info.reduction()):
        assert m.shape == (2, chs, -(-128 // red), -(-96 // red)), (m.shape, chs, red)
        torch.testing.assert_close(m, i)
    last = timm.create_model(name, features_only=True, out_indices=(-1,))
    assert last.feature_info.channels() == [info.channels()[-1]]


@pytest.mark.parametrize("name", REPRESENTATIVES)
def test_forward_intermediates_and_pruning(name):
    model = _create(name).eval()
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        torch.testing.assert_close(model.forward_head(final), model(x))
        pre = model.forward_head(model.forward_features(x), pre_logits=True)
    assert pre.shape == (1, model.num_features) or pre.shape[-1] == model.head_hidden_size
    params_before = sum(p.numel() for p in model.parameters())
    model.prune_intermediate_layers(indices=[0, 1], prune_head=True)  # keep up to the second output
    assert sum(p.numel() for p in model.parameters()) < params_before
    with torch.no_grad():
        pruned = model.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
        last_two = model.forward_intermediates(x, indices=2, intermediates_only=True)
    assert len(pruned) == 2
    for a, b, c in zip(pruned, last_two, inter[:2]):
        torch.testing.assert_close(a, c)
        torch.testing.assert_close(b, c)


@pytest.mark.parametrize("name", REPRESENTATIVES)
def test_backward_reaches_every_parameter(name):
    model = _create(name, drop_path_rate=0.1, num_classes=10).train()
    model(torch.randn(2, 3, 64, 64)).logsumexp(-1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", REPRESENTATIVES)
def test_grad_checkpointing_gives_the_same_gradients(name):
    x = torch.randn(1, 3, 64, 64)
    grads = []
    for checkpointing in (False, True):
        model = _create(name, num_classes=5).train()
        model.set_grad_checkpointing(checkpointing)
        model(x).sum().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for k in grads[0]:
        torch.testing.assert_close(grads[0][k], grads[1][k], msg=k)


@pytest.mark.parametrize("name", REPRESENTATIVES)
def test_classifier_api(name):
    model = _create(name, in_chans=1, num_classes=7, drop_rate=0.1).eval()
    x = torch.randn(1, 1, 64, 64)
    assert model(x).shape == (1, 7)
    model.reset_classifier(3)
    assert model(x).shape == (1, 3)
    model.reset_classifier(0)
    assert model(x).shape == (1, model.num_features)
    groups = model.group_matcher()
    assert "stem" in groups and "blocks" in groups
    names = {n for n, _ in model.named_parameters()}
    no_decay = model.no_weight_decay()
    assert no_decay, "A_log, D and norms are not decayed"
    # timm matches wildcard entries with fnmatch: every entry must name real parameters.
    import fnmatch
    for pattern in no_decay:
        assert any(fnmatch.fnmatch(n, pattern) or n == pattern for n in names), pattern


@pytest.mark.parametrize("name", REPRESENTATIVES)
def test_odd_detection_sized_input(name):
    model = _create(name, num_classes=4).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 200, 300))
    assert out.shape == (1, 4) and torch.isfinite(out).all()


@pytest.mark.parametrize("name", REPRESENTATIVES)
def test_torch_compile_fullgraph(name):
    model = _create(name, num_classes=4).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", REPRESENTATIVES)
def test_trains_after_an_inference_mode_forward(name):
    """Evaluation under torch.inference_mode must not leave state that breaks the next training step."""
    model = _create(name, num_classes=3)
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        model.eval()(x)
    model.train()(x).sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


# The public scan ops' defaults before selective_scan_2d took mamba_ssm's (no softplus): what every model was
# written against.
FORMER_SCAN_DEFAULTS = {"selective_scan": dict(delta_softplus=False), "selective_scan_states": dict(delta_softplus=False),
                        "selective_scan_2d": dict(delta_softplus=True)}


@pytest.mark.parametrize("name", REPRESENTATIVES)
def test_scan_calls_pass_softplus_so_outputs_do_not_hang_on_op_defaults(name, monkeypatch):
    """Every scan call of a model names delta_softplus, and its output is bitwise the one it gives when every
    call is handed the ops' former defaults explicitly."""
    model = _create(name).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        now = model(x)
    named = []

    def with_former_defaults(op, former):
        def call(*args, **kwargs):
            bound = inspect.signature(op).bind(*args, **kwargs)
            named.append(former.keys() <= bound.arguments.keys())
            for key, value in former.items():
                bound.arguments.setdefault(key, value)
            return op(*bound.args, **bound.kwargs)
        return call

    for op_name, former in FORMER_SCAN_DEFAULTS.items():
        op = getattr(vmamba_kernels, op_name)
        for module_name, module in list(sys.modules.items()):
            if module_name.startswith("vmamba_zoo") and getattr(module, op_name, None) is op:
                monkeypatch.setattr(module, op_name, with_former_defaults(op, former))
    with torch.no_grad():
        before = model(x)
    assert named and all(named), f"{named.count(False)} of {len(named)} scan calls leave delta_softplus to the default"
    assert torch.equal(now, before)


@pytest.mark.parametrize("name", EXPECTED_MODELS)
def test_unpooled_headless_model_returns_the_nhwc_feature_map(name):
    """timm's `num_classes=0, global_pool=''`: the model returns its (normed) last map, channels-last like
    forward_features in every family (README, Using a model from timm), and `reset_classifier(0, '')` gives the
    same."""
    model = _create(name, num_classes=0, global_pool="").eval()
    reduction = model.feature_info[-1]["reduction"]
    x = torch.randn(1, 3, 2 * reduction, 3 * reduction)  # non-square, so H and W cannot be confused
    with torch.no_grad():
        features = model.forward_features(x)
        out = model(x)
    assert features.shape == (1, 2, 3, model.num_features), "forward_features is (B, H, W, C)"
    assert getattr(model, "output_fmt", "NHWC") == "NHWC"
    assert out.shape == features.shape
    torch.testing.assert_close(out, model.forward_head(features))

    if name in REPRESENTATIVES:  # one model per family: building a second model is the slow part
        pooled = _create(name, num_classes=5).eval()
        pooled.reset_classifier(0, "")
        with torch.no_grad():
            assert pooled(x).shape == features.shape


# The families whose _create_* checks the pretrained source before building (plainmamba and mambamixer: not yet).
CHECKED_PRETRAINED_SOURCE = ["efficientvmamba_tiny", "groupmamba_tiny", "plainmamba_l1", "spatialmamba_tiny",
                             "vim2_tiny", "vmamba_tiny_s1l8"]


@pytest.mark.parametrize("name", CHECKED_PRETRAINED_SOURCE)
def test_a_missing_pretrained_file_fails_at_once_naming_the_path(name, tmp_path):
    missing = tmp_path / "not_downloaded.pth"
    with pytest.raises(FileNotFoundError, match=re.escape(f"pretrained file not found: {missing}")):
        timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(missing)))


@pytest.mark.parametrize("name", EXPECTED_MODELS)
def test_pretrained_urls_are_direct_files(name):
    url = timm.get_pretrained_cfg(name).to_dict().get("url") or ""
    assert "drive.google.com" not in url and not url.endswith("/view"), f"{url} is a web page, not a file"


@pytest.mark.parametrize("name, says", [
    ("spatialmamba_tiny", r"drive\.google\.com/file/d/19kX.*pretrained_cfg_overlay=dict\(file=PATH\)"),
    ("vmamba_tiny_mhs", r"no published weights"),
])
def test_pretrained_without_downloadable_weights_fails_at_once_saying_where(name, says):
    with pytest.raises(ValueError, match=f"{name} has no downloadable weights: .*{says}"):
        timm.create_model(name, pretrained=True)


@pytest.mark.parametrize("name", ["efficientvmamba_tiny", "spatialmamba_tiny", "vim2_tiny"])
def test_a_bare_linear_head_file_loads_into_the_classifier_head(name):
    """Files whose classifier is ``head.weight`` (official layouts, the zoo's earlier files) load into ``head.fc``."""
    model = _create(name, num_classes=7)
    source = _create(name, num_classes=7)
    with torch.no_grad():
        source.get_classifier().weight.normal_()
    old_layout = {k.replace("head.fc.", "head."): v for k, v in source.state_dict().items()}
    assert "head.weight" in old_layout and "head.fc.weight" not in old_layout
    filter_fn = _module_of(model).checkpoint_filter_fn
    model.load_state_dict(filter_fn(old_layout, model), strict=True)
    assert torch.equal(model.get_classifier().weight, source.get_classifier().weight)


@pytest.mark.parametrize("name", ["plainmamba_l1", "efficientvmamba_tiny", "spatialmamba_tiny", "vim2_tiny",
                                  "vmamba_tiny_s1l8"])
def test_classifier_head_reset_and_bad_pool(name):
    model = _create(name, num_classes=5).eval()
    x = torch.randn(1, 3, 64, 64)
    pooled = model.forward_head(model.forward_features(x), pre_logits=True)
    model.reset_classifier(3)
    torch.testing.assert_close(model(x), F.linear(pooled, model.get_classifier().weight, model.get_classifier().bias))
    with pytest.raises(ValueError, match=r"global_pool must be .*, got 'token'"):
        model.reset_classifier(3, "token")
