"""vss.semi against the official U2PL functions (tests/data/u2pl_vectors.npz, produced by running
Haochen-Wang409/U2PL@ab3d2be; keys described in the fixture's own README), plus slow
per-pixel reference implementations for the paper-behaviour flags."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from vss import semi

VECTORS = Path(__file__).resolve().parent / "data" / "u2pl_vectors.npz"
K = 5  # classes in the vectors


@pytest.fixture(scope="module")
def vec() -> dict:
    with np.load(VECTORS) as d:
        return {k: d[k] for k in d.files}


def t(vec: dict, key: str) -> torch.Tensor:
    return torch.from_numpy(np.array(vec[key]))


def contra_cfg(vec: dict) -> semi.ContrastiveConfig:
    fields = {k[len("contra_cfg_") :]: vec[k].item() for k in vec if k.startswith("contra_cfg_")}
    return semi.ContrastiveConfig(**fields)


def new_bank(vec: dict) -> semi.MemoryBank:
    sizes = vec["contra_queue_size"]
    assert len(set(sizes[1:].tolist())) == 1
    return semi.MemoryBank(K, 16, queue_size=int(sizes[1]), class0_queue_size=int(sizes[0]))


def bank_from(vec: dict, it: int, when: str) -> semi.MemoryBank:
    """A bank holding the recorded contents before/after call ``it``."""
    bank = new_bank(vec)
    rows = t(vec, f"contra_it{it}_bank_{when}")
    bank.queues = list(torch.split(rows, vec[f"contra_it{it}_bank_{when}_len"].tolist()))
    bank.ptrs = vec[f"contra_it{it}_ptr_{when}"].tolist()
    return bank


def replay(vec: dict, it: int):
    """randint(high, n) that returns the indices the official call drew, checking high and n."""
    highs = vec[f"contra_it{it}_randint_high"].tolist()
    lens = vec[f"contra_it{it}_randint_len"].tolist()
    values = vec[f"contra_it{it}_randint_values"]
    state = {"call": 0, "offset": 0}

    def randint(high: int, n: int) -> torch.Tensor:
        k = state["call"]
        assert k < len(highs), "more random draws than the official call made"
        assert (high, n) == (
            highs[k],
            lens[k],
        ), f"draw {k}: ({high}, {n}) != official ({highs[k]}, {lens[k]})"
        out = torch.from_numpy(values[state["offset"] : state["offset"] + n].copy())
        state["call"] += 1
        state["offset"] += n
        return out

    randint.calls = lambda: state["call"]
    return randint


def contra_call(vec, it, bank, randint=None, **flags):
    p = f"contra_it{it}_"
    rep = t(vec, p + "rep").clone().requires_grad_(True)
    loss, new_keys = semi.compute_contra_memobank_loss(
        rep,
        t(vec, p + "label_l_onehot").long(),
        t(vec, p + "label_u_onehot").long(),
        t(vec, p + "prob_l"),
        t(vec, p + "prob_u"),
        t(vec, p + "low_mask"),
        t(vec, p + "high_mask"),
        contra_cfg(vec),
        bank,
        t(vec, p + "rep_teacher"),
        randint=randint,
        **flags,
    )
    loss.backward()
    return loss.detach(), rep.grad, new_keys


# ---------------------------------------------------------------------------------------------
# Unsupervised loss
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("j", range(4))
def test_unsup_loss_matches_official(vec, j):
    percent = float(vec["unsup_percent"][j])
    predict = t(vec, "unsup_predict").clone().requires_grad_(True)
    target = t(vec, "unsup_target")
    target_in = target.clone()
    loss, thresh, target_after = semi.compute_unsupervised_loss(predict, target, percent, t(vec, "unsup_pred_teacher"))
    loss.backward()
    assert torch.equal(target, target_in), "the caller's target must not be modified"
    np.testing.assert_allclose(loss.item(), vec["unsup_loss"][j], rtol=1e-6)
    np.testing.assert_allclose(thresh, vec["unsup_thresh"][j], rtol=1e-6)  # float32 tolerance
    np.testing.assert_array_equal(target_after.numpy(), vec["unsup_target_after"][j])
    np.testing.assert_allclose(predict.grad.numpy(), vec["unsup_grad_predict"][j], rtol=1e-5, atol=1e-8)


def _ce_per_pixel(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Slow reference CE: -log softmax at the target, per pixel (float64)."""
    n, _, h, w = logits.shape
    out = torch.zeros(n, h, w, dtype=torch.float64)
    for b in range(n):
        for y in range(h):
            for x in range(w):
                z = logits[b, :, y, x].double()
                out[b, y, x] = torch.logsumexp(z, 0) - z[target[b, y, x]] if target[b, y, x] != 255 else 0.0
    return out


def test_unsup_normalisations_against_reference(vec):
    predict, teacher, target = (
        t(vec, "unsup_predict"),
        t(vec, "unsup_pred_teacher"),
        t(vec, "unsup_target"),
    )
    n, _, h, w = predict.shape
    official, _, kept = semi.compute_unsupervised_loss(predict, target, 80.0, teacher)
    paper, _, kept_p = semi.compute_unsupervised_loss(predict, target, 80.0, teacher, paper_normalisation=True)
    assert torch.equal(kept, kept_p)
    ce_sum = _ce_per_pixel(predict, kept).sum().item()
    n_kept = int((kept != 255).sum())
    np.testing.assert_allclose(official.item(), n * h * w * ce_sum / n_kept**2, rtol=1e-5)
    np.testing.assert_allclose(paper.item(), ce_sum / (n * h * w), rtol=1e-5)
    assert abs(official.item() - paper.item()) > 1.0


def test_unsup_all_ignored_is_zero_not_nan():
    predict = torch.randn(1, 3, 4, 4, requires_grad=True)
    loss, thresh, target = semi.compute_unsupervised_loss(
        predict, torch.full((1, 4, 4), 255), 80.0, torch.randn(1, 3, 4, 4)
    )
    loss.backward()
    assert loss.item() == 0.0 and np.isnan(thresh) and bool((target == 255).all())
    assert torch.count_nonzero(predict.grad) == 0


@pytest.mark.parametrize("j", range(4))
def test_pseudo_label_targets_matches_unsup(vec, j):
    entropy = semi.pixel_entropy(torch.softmax(t(vec, "unsup_pred_teacher"), dim=1))
    out = semi.pseudo_label_targets(t(vec, "unsup_target"), entropy, float(vec["unsup_percent"][j]))
    np.testing.assert_array_equal(out.numpy(), vec["unsup_target_after"][j])


def test_ensemble_pseudo_labels():
    g = torch.Generator().manual_seed(0)
    a = torch.softmax(torch.randn(2, 4, 3, 5, generator=g), 1)
    b = torch.softmax(torch.randn(2, 4, 3, 5, generator=g), 1)
    labels, entropy = semi.ensemble_pseudo_labels([a, b], weights=[3.0, 1.0])
    mean = (0.75 * a + 0.25 * b).numpy()
    np.testing.assert_array_equal(labels.numpy(), mean.argmax(1))
    np.testing.assert_allclose(entropy.numpy(), -(mean * np.log(mean + 1e-10)).sum(1), rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# One-hot, entropy masks
# ---------------------------------------------------------------------------------------------


def _onehot_reference(labels: torch.Tensor, k: int, official: bool) -> torch.Tensor:
    """Per-pixel loops. Official: scatter along dim 0 of a (K,B,H,W) tensor with index
    (B,1,H,W): out[label[b,y,x] (255 -> 0), 0, y, x] = 1 for every b; then every (b,y,x) with
    label 255 zeroes out[:, b, y, x]; finally permuted to (B,K,H,W)."""
    b_, h, w = labels.shape
    out = torch.zeros(b_, k, h, w)
    for b in range(b_):
        for y in range(h):
            for x in range(w):
                v = int(labels[b, y, x])
                if official:
                    out[0, 0 if v == 255 else v, y, x] = 1.0
                elif v != 255:
                    out[b, v, y, x] = 1.0
    if official:
        for b in range(b_):
            for y in range(h):
                for x in range(w):
                    if labels[b, y, x] == 255:
                        out[b, :, y, x] = 0.0
    return out


def test_label_onehot_matches_official_vectors(vec):
    for it in range(3):  # official label_onehot output (quirk 1 visible: image 1 all zeros)
        for part in ("l", "u"):
            lab = t(vec, f"contra_it{it}_label_{part}")
            got = semi.label_onehot(lab, K, official=True)
            np.testing.assert_array_equal(got.numpy(), vec[f"contra_it{it}_label_{part}_onehot"])
    for part in ("l", "u"):  # it3: a correct per-image one-hot
        got = semi.label_onehot(t(vec, f"contra_it3_label_{part}"), K, official=False)
        np.testing.assert_array_equal(got.numpy(), vec[f"contra_it3_label_{part}_onehot"])


def test_label_onehot_flag_matters_only_for_several_images():
    g = torch.Generator().manual_seed(1)
    for b in (1, 2, 3):
        labels = torch.randint(0, 4, (b, 5, 6), generator=g)
        labels[torch.rand(b, 5, 6, generator=g) < 0.2] = 255
        official = semi.label_onehot(labels, 4, official=True)
        paper = semi.label_onehot(labels, 4, official=False)
        assert torch.equal(official, _onehot_reference(labels, 4, official=True))
        assert torch.equal(paper, _onehot_reference(labels, 4, official=False))
        assert torch.equal(official, paper) == (b == 1)


def test_label_onehot_rejects_bad_ids():
    with pytest.raises(ValueError, match="outside 0..3"):
        semi.label_onehot(torch.tensor([[[0, 4]]]), 4)


def test_entropy_thresholds_and_contrastive_inputs(vec):
    alpha = float(vec["contra_alpha_t"])
    for it in range(4):
        p = f"contra_it{it}_"
        entropy, label_u = t(vec, p + "entropy_u"), t(vec, p + "label_u")
        valid = label_u != 255
        assert semi.entropy_percentile(entropy, valid, alpha) == pytest.approx(vec[p + "low_thresh"], rel=1e-6)
        assert semi.entropy_percentile(entropy, valid, 100 - alpha) == pytest.approx(vec[p + "high_thresh"], rel=1e-6)
        low, high = semi.entropy_masks(entropy, valid, alpha)
        np.testing.assert_array_equal(low.float().numpy(), vec[p + "low_mask"][2:, 0])
        np.testing.assert_array_equal(high.float().numpy(), vec[p + "high_mask"][2:, 0])
        out = semi.contrastive_inputs(t(vec, p + "label_l"), label_u, entropy, alpha, (8, 8), K, official_onehot=it < 3)
        for key, ref in (
            ("low_mask", "low_mask"),
            ("high_mask", "high_mask"),
            ("label_l", "label_l_onehot"),
            ("label_u", "label_u_onehot"),
        ):
            np.testing.assert_array_equal(out[key].numpy(), vec[p + ref], err_msg=f"it{it} {key}")
        # The probabilities passed to the loss are the teacher's softmax.
        prob = torch.softmax(t(vec, p + "teacher_logits"), 1)
        np.testing.assert_allclose(prob[:2].numpy(), vec[p + "prob_l"], rtol=1e-6)


def test_contrastive_inputs_downsample_nearest():
    g = torch.Generator().manual_seed(2)
    label_l = torch.randint(0, 3, (1, 8, 8), generator=g)
    label_u = torch.randint(0, 3, (1, 8, 8), generator=g)
    out = semi.contrastive_inputs(label_l, label_u, torch.rand(1, 8, 8, generator=g), 20.0, (4, 4), 3)
    assert out["low_mask"].shape == (2, 1, 4, 4) and out["label_l"].shape == (1, 3, 4, 4)
    np.testing.assert_array_equal(out["label_l"][0].argmax(0).numpy(), label_l[0, ::2, ::2].numpy())


# ---------------------------------------------------------------------------------------------
# Contrastive loss and memory bank
# ---------------------------------------------------------------------------------------------


def test_contra_four_calls_match_official(vec):
    bank = new_bank(vec)
    assert list(vec["contra_scenarios"]) == [
        "all_classes",
        "class1_absent",
        "single_class",
        "all_classes_true_onehot",
    ]
    for it in range(int(vec["contra_num_iters"])):
        p = f"contra_it{it}_"
        np.testing.assert_array_equal(torch.cat(bank.queues).numpy(), vec[p + "bank_before"])
        randint = replay(vec, it)
        loss, grad, new_keys = contra_call(vec, it, bank, randint)
        assert randint.calls() == len(vec[p + "randint_high"]), f"it{it}: fewer random draws than official"
        np.testing.assert_allclose(loss.item(), vec[p + "loss"], rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(grad.numpy(), vec[p + "grad_rep"], rtol=1e-5, atol=1e-7)
        assert new_keys == vec[p + "new_keys"].tolist()
        assert bank.lengths() == vec[p + "bank_after_len"].tolist()
        np.testing.assert_array_equal(torch.cat(bank.queues).numpy(), vec[p + "bank_after"])
        assert bank.ptrs == vec[p + "ptr_after"].tolist()
    assert float(vec["contra_it2_loss"]) == 0.0  # single_class: <= 1 valid class


@pytest.mark.parametrize("it", [0, 3])
def test_pairing_flag_identical_when_no_class_is_missing(vec, it):
    # all_classes scenarios: valid classes are 0..K-1, so both pairings draw the same indices.
    loss_o, grad_o, keys_o = contra_call(vec, it, bank_from(vec, it, "before"), replay(vec, it))
    loss_p, grad_p, keys_p = contra_call(vec, it, bank_from(vec, it, "before"), replay(vec, it), official_pairing=False)
    assert keys_o == keys_p
    assert loss_o.item() == loss_p.item()
    assert torch.equal(grad_o, grad_p)


def test_pairing_flag_differs_when_a_lower_class_is_absent(vec):
    # class1_absent: valid classes [0, 2, 3, 4]; official pairs class 2's anchors with bank 3.
    assert not (vec["contra_it1_label_l"] == 1).any() and not (vec["contra_it1_label_u"] == 1).any()
    losses, grads = [], []
    for official in (True, False):
        torch.manual_seed(0)
        loss, grad, _ = contra_call(vec, 1, bank_from(vec, 1, "before"), official_pairing=official)
        losses.append(loss.item())
        grads.append(grad)
    assert abs(losses[0] - losses[1]) > 1e-3
    assert not torch.equal(grads[0], grads[1])


def _negatives_reference(vec, it, paper: bool) -> list[torch.Tensor]:
    """Per-pixel loop over the negative-key rule; returns the teacher keys per class."""
    p = f"contra_it{it}_"
    cfg = contra_cfg(vec)
    onehot = torch.cat([t(vec, p + "label_l_onehot"), t(vec, p + "label_u_onehot")])
    prob = torch.cat([t(vec, p + "prob_l"), t(vec, p + "prob_u")])
    high = t(vec, p + "high_mask")
    rep_t = t(vec, p + "rep_teacher")
    n_l = vec[p + "label_l"].shape[0]
    keys = [[] for _ in range(K)]
    for c in range(K):
        for b in range(prob.shape[0]):
            for y in range(8):
                for x in range(8):
                    ranking = sorted(range(K), key=lambda k: -float(prob[b, k, y, x]))
                    r = ranking.index(c)
                    labelled = b < n_l
                    in_rank = r < cfg.low_rank if labelled else cfg.low_rank <= r < cfg.high_rank
                    is_c = onehot[b, c, y, x] == 1
                    if paper:
                        ok = (not is_c) and in_rank
                    else:  # official: high_valid needs is_c, the labelled rule needs not is_c
                        ok = is_c and in_rank and not (labelled and is_c)
                    if ok and high[b, 0, y, x] > 0 and prob[b, c, y, x] < cfg.current_class_negative_threshold:
                        keys[c].append(rep_t[b, :, y, x])
    return [torch.stack(k) if k else torch.zeros(0, 16) for k in keys]


@pytest.mark.parametrize("paper", [False, True])
def test_negative_rule_against_reference(vec, paper):
    it = 3  # true one-hot labels
    bank = semi.MemoryBank(K, 16, queue_size=10_000, class0_queue_size=None)
    torch.manual_seed(0)
    _, _, new_keys = contra_call(vec, it, bank, paper_negatives=paper)
    ref = _negatives_reference(vec, it, paper)
    assert new_keys == [len(r) for r in ref]
    for c in range(K):
        np.testing.assert_array_equal(bank.queues[c].numpy(), ref[c].numpy())
    if paper:  # the paper rule takes labelled negatives, which the official rule never does
        official = _negatives_reference(vec, it, paper=False)
        assert sum(map(len, ref)) > sum(map(len, official))


def test_memory_bank_fifo_and_state():
    bank = semi.MemoryBank(3, 2, queue_size=3, class0_queue_size=4)

    def rows(a, n):
        return torch.arange(a, a + n, dtype=torch.float32).repeat_interleave(2).view(n, 2)

    assert bank.enqueue([rows(0, 2), rows(10, 1), torch.zeros(0, 2)]) == [2, 1, 0]
    assert bank.enqueue([rows(2, 3), rows(11, 5), rows(20, 2)]) == [3, 5, 2]
    np.testing.assert_array_equal(bank.queues[0][:, 0].numpy(), [1, 2, 3, 4])  # newest 4 rows
    np.testing.assert_array_equal(bank.queues[1][:, 0].numpy(), [13, 14, 15])  # newest 3 rows
    np.testing.assert_array_equal(bank.queues[2][:, 0].numpy(), [20, 21])
    assert bank.ptrs == [4, 3, 2]
    other = semi.MemoryBank(3, 2, queue_size=3, class0_queue_size=4)
    other.load_state_dict(bank.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(other.queues, bank.queues)) and other.ptrs == bank.ptrs
    with pytest.raises(ValueError, match="expected 3 key tensors"):
        bank.enqueue([rows(0, 1)])


def _gather_worker(rank: int, world: int, store: str, out_dir: str) -> None:
    import torch.distributed as dist

    from vss import distributed as vd

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    vd.init_distributed("cpu")
    try:
        counts = [[2, 0, 1], [0, 3, 1]][rank]  # class 1 only on rank 1, class 0 only on rank 0
        keys = [torch.full((n, 4), 100.0 * rank + 10 * c) + torch.arange(n).view(-1, 1) for c, n in enumerate(counts)]
        bank = semi.MemoryBank(3, 4, queue_size=10, class0_queue_size=None)
        nothing = bank.enqueue([torch.zeros(0, 4)] * 3)  # no key on any rank
        added = bank.enqueue(keys)
        torch.save(
            {"nothing": nothing, "added": added, "queues": bank.queues},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        vd.cleanup()


def test_memory_bank_gathers_keys_from_all_ranks(tmp_path):
    mp.spawn(_gather_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    expect = [[0, 1], [110, 111, 112], [20, 120]]  # per class: rank 0's rows, then rank 1's
    for rank in range(2):
        out = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert out["nothing"] == [0, 0, 0] and out["added"] == [2, 3, 2]
        for c in range(3):
            np.testing.assert_array_equal(out["queues"][c][:, 0].numpy(), expect[c])


# ---------------------------------------------------------------------------------------------
# Schedules, EMA, LR, head, CutMix
# ---------------------------------------------------------------------------------------------


def test_schedules_match_official(vec):
    epochs = int(vec["sched_epochs"])
    got_drop = [semi.drop_percent(e / epochs) for e in range(epochs)]
    got_alpha = [semi.unreliable_alpha(e / epochs) for e in range(epochs)]
    np.testing.assert_allclose(got_drop, vec["sched_drop_percent"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(got_alpha, vec["sched_alpha_t"], rtol=0, atol=1e-12)
    got_ema = [semi.ema_decay(int(k)) for k in vec["sched_ema_k"]]
    np.testing.assert_allclose(got_ema, vec["sched_ema_decay"], rtol=0, atol=1e-15)
    with pytest.raises(ValueError):
        semi.drop_percent(1.5)


def test_poly_lr_matches_official(vec):
    max_iter = int(vec["lr_data_size"]) * int(vec["lr_epochs"])
    got = [
        [semi.poly_lr(float(b), i, max_iter, float(vec["lr_power"])) for b in vec["lr_base"]] for i in range(max_iter)
    ]
    np.testing.assert_allclose(got, vec["lr_used"], rtol=1e-12, atol=0)


def test_ema_update_parameters_only():
    torch.manual_seed(0)
    student = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 1), torch.nn.BatchNorm2d(3))
    teacher = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 1), torch.nn.BatchNorm2d(3))
    student[1].running_mean.fill_(5.0)
    t0 = [p.clone() for p in teacher.parameters()]
    semi.ema_update(teacher, student, 0.9)
    for p0, pt, ps in zip(t0, teacher.parameters(), student.parameters()):
        torch.testing.assert_close(pt, 0.9 * p0 + 0.1 * ps, rtol=0, atol=0)
    assert torch.equal(teacher[1].running_mean, torch.zeros(3))  # buffers untouched
    semi.ema_update(teacher, student, semi.ema_decay(0))  # k = 0: decay 0 -> a copy
    assert all(torch.equal(a, b) for a, b in zip(teacher.parameters(), student.parameters()))


def test_representation_head():
    head = semi.RepresentationHead(8, dim=16, hidden=12).eval()
    kinds = [type(m).__name__ for m in head.layers]
    assert kinds == ["Conv2d", "BatchNorm2d", "ReLU", "Dropout2d"] * 2 + ["Conv2d"]
    assert [head.layers[i].kernel_size for i in (0, 4, 8)] == [(3, 3), (3, 3), (1, 1)]
    x = torch.randn(2, 8, 6, 7)
    ref = x
    for m in head.layers:  # eval: dropout is the identity
        ref = m(ref)
    y = head(x)
    assert y.shape == (2, 16, 6, 7) and torch.equal(y, ref)
    manual = F.conv2d(
        F.relu(
            head.layers[5](
                F.conv2d(
                    F.relu(head.layers[1](F.conv2d(x, head.layers[0].weight, head.layers[0].bias, padding=1))),
                    head.layers[4].weight,
                    head.layers[4].bias,
                    padding=1,
                )
            )
        ),
        head.layers[8].weight,
        head.layers[8].bias,
    )
    torch.testing.assert_close(y, manual)


def test_cutmix_matches_official(vec):
    np.random.seed(int(vec["cutmix_np_seed"]))
    images, labels, conf = semi.generate_cutmix(t(vec, "cutmix_image"), t(vec, "cutmix_label"), t(vec, "cutmix_conf"))
    np.testing.assert_array_equal(images.numpy(), vec["cutmix_image_out"])
    np.testing.assert_array_equal(labels.numpy(), vec["cutmix_label_out"])
    np.testing.assert_array_equal(conf.numpy(), vec["cutmix_conf_out"])
    again = semi.generate_cutmix(
        t(vec, "cutmix_image"),
        t(vec, "cutmix_label"),
        t(vec, "cutmix_conf"),
        rng=np.random.RandomState(int(vec["cutmix_np_seed"])),
    )
    assert torch.equal(again[1], labels)
