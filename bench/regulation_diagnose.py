"""Why attention regulation has little to work with on a toy model: six diagnostics.

    python bench/regulation_diagnose.py                      # toy-sd3
    python bench/regulation_diagnose.py --model toy-flux --json flux_diag.json

1. **Which path carries the prompt.** Each pair prompt is generated with its own per-token embeddings (what the
   joint attention reads) but the pooled vector (adaLN) of another prompt, and the images are scored against
   both prompts. Whatever follows the tokens can be steered through attention; whatever follows the pooled
   vector cannot; whatever follows neither the model has not learnt.
2. **Does word attention place objects.** A fixed bias +β on the logits of object 1's words ("<colour>
   <shape>") for image queries in the left half of the image and −β in the right half (object 2 the other way)
   at the regulated sites and steps. If attention to a word decides where its object is drawn, object 1's
   colour moves left and object 2's right; the table gives the share of detected objects of each colour on
   the steered side, with and without the bias. ``--bias-scope text`` applies the bias inside the text
   attention only (each image token keeps its total text attention), as ``AttentionRegulation(bias_scope="text")``.
3. **What a wrong object is.** Every detected object of a prompted colour, by its shape: the shape prompted for
   that colour, the *other* object's shape (a binding error between the two objects), a shape not in the prompt,
   or none recognised.
4. **Do the text encoders mix the nouns** (SD3 only). Each object's word tokens are replaced by the same words'
   embeddings from its own single-object prompt ("a red circle"), which never saw the other object, and the
   shape errors are counted again.
5. **Does regulation restore a neglected word** (the failure it is built for). The toy models do not neglect
   words on their own, so neglect is injected: in every block the keys of the second object's word tokens
   ("<colour> <shape>", every text segment) are multiplied by ``s < 1`` on the conditional rows, so image queries
   attend them less (their values are untouched). The images are scored with and without AttentionRegulation on
   the phrases (each config of ``--configs``), with the second object found (its colour; its colour and shape) as
   the figure that neglect moves.
6. **Do the objects' tokens mix in the text stream.** In MM-DiT the text tokens attend to one another in every
   block, so a mid-depth "circle" token may carry "square". The text→text logits between different objects'
   phrase tokens are set to −∞ in every joint block on the conditional rows (each object's tokens read only
   their own object's, the context tokens and the image), with and without AttentionRegulation on the phrases.

Same seeds with and without each intervention; independent noise per item (as ``bench/regulation_eval.py``).
"""

from __future__ import annotations

import argparse
import json
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from regulation_eval import call_kwargs, generate, to_uint8
from report import emit, positive_int

from attnctl.headhunt import pair_seed
from attnctl.toyworld.world import object_words

DIAGNOSTICS = ("which_path", "steering", "shape_errors", "neglect", "text_isolation")


def _embed(pipe, prompt: str, length: int) -> dict[str, torch.Tensor]:
    if hasattr(pipe, "text_encoder_3"):  # SD3: CFG needs the negative (empty prompt) embeddings too
        e, ne, pooled, npooled = pipe.encode_prompt(prompt=prompt, prompt_2=None, prompt_3=None,
                                                    max_sequence_length=length)
        return {"prompt_embeds": e, "negative_prompt_embeds": ne, "pooled_prompt_embeds": pooled,
                "negative_pooled_prompt_embeds": npooled}
    e, pooled, _ = pipe.encode_prompt(prompt=prompt, prompt_2=None, max_sequence_length=length)
    return {"prompt_embeds": e, "pooled_prompt_embeds": pooled}


def _seeds(index: int, seeds: range) -> list[int]:
    return [pair_seed(index, s, "per_prompt") for s in seeds]


def _from_embeddings(pipe, emb: dict[str, torch.Tensor], seeds: list[int], call: dict[str, Any]) -> list[np.ndarray]:
    """One image per seed from precomputed prompt embeddings (the call defaults without the text length)."""
    kw = {k: v for k, v in call.items() if k != "max_sequence_length"}
    gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    batched = {k: v.repeat(len(seeds), *[1] * (v.dim() - 1)) for k, v in emb.items()}
    return to_uint8(pipe(**batched, generator=gens, **kw).images)


def plain_images(pipe, items: list[dict], seeds: range, call: dict[str, Any]) -> list[list[np.ndarray]]:
    """Every item's images without any control — the reference row of all three diagnostics."""
    return [generate(pipe, item["prompt"], _seeds(i, seeds), call, None)[0] for i, item in enumerate(items)]


def which_path(pipe, items: list[dict], plain: list[list[np.ndarray]], seeds: range,
               call: dict[str, Any]) -> dict[str, dict[str, float]]:
    from attnctl.toyworld.evaluate import evaluate_set

    length = call["max_sequence_length"]
    scored: dict[str, tuple[list, list]] = {"own prompt": ([], []), "tokens' prompt": ([], []),
                                            "pooled vector's prompt": ([], [])}
    for i, item in enumerate(items):
        other = items[(i + len(items) // 2) % len(items)]  # a different pair prompt
        own, theirs = _embed(pipe, item["prompt"], length), _embed(pipe, other["prompt"], length)
        mixed = {k: (theirs if "pooled" in k else own)[k] for k in own}  # tokens of item, pooled of other
        ims = _from_embeddings(pipe, mixed, _seeds(i, seeds), call)
        for key, images, ref in (("own prompt", plain[i], item), ("tokens' prompt", ims, item),
                                 ("pooled vector's prompt", ims, other)):
            scored[key][0].extend(images)
            scored[key][1].extend([ref] * len(images))
    keys = ("presence", "colour_binding", "object_recall", "colour_accuracy", "shape_accuracy")
    out = {}
    for name, (ims, refs) in scored.items():
        m = evaluate_set(ims, refs)
        out[name] = {k: round(m[k], 4) for k in keys}
    return out


def _side_steer(beta: float, plus_only: bool = False, **kwargs):
    """An AttentionRegulation whose bias is fixed: target 0 gets +β on the left half and −β on the right, target
    1 the reverse (``plus_only``: +β on its own side, 0 on the other); the control's site, step, role and word
    handling, none of its optimisation."""
    from attnctl.controls.regulation import AttentionRegulation

    class SideSteer(AttentionRegulation):
        def _bias(self, call, state, q, k, batch, img, tg, grid, logits, lse, memory, prompt, ids):
            nb, n_img, heads, n_cols = logits.shape
            n_t = len(tg.positions)
            h, w = grid
            left = (torch.arange(w, device=logits.device).repeat(h) < w / 2).float()  # row-major grid
            right = 1 - left
            if not plus_only:
                left, right = left - right, right - left
            per_word = torch.stack([left, right], dim=-1) * beta  # (N, 2)
            bias = torch.zeros((1, n_img, 1, n_cols), device=logits.device)
            bias[0, :, 0, :n_t] = per_word[:, torch.tensor(tg.word_of, device=logits.device)]
            return bias.expand(nb, n_img, heads, n_cols)

    return SideSteer(restore_special=False, **kwargs)


def steering(pipe, items: list[dict], plain: list[list[np.ndarray]], seeds: range, call: dict[str, Any],
             betas: list[float], sites: str, steps: str, plus_only: bool = False,
             bias_scope: str = "joint") -> dict[str, dict[str, float]]:
    from attnctl.toyworld.evaluate import detect_objects, evaluate_set

    out = {}
    for beta in [0.0, *betas]:
        images, refs, on_side, found = [], [], 0, 0
        for i, item in enumerate(items):
            if beta:
                steer = _side_steer(beta, plus_only, targets=object_words(item, "phrases"), sites=sites, steps=steps,
                                    bias_scope=bias_scope)
                ims, _ = generate(pipe, item["prompt"], _seeds(i, seeds), call, [steer])
            else:
                ims = plain[i]
            images.extend(ims)
            refs.extend([item] * len(seeds))
            colours = [o["colour"] for o in item["objects"]]
            for im in ims:
                for obj in detect_objects(im):
                    if obj.colour in colours[:2] and colours[0] != colours[1]:
                        found += 1
                        left = obj.centroid[0] < 0.5
                        on_side += left if obj.colour == colours[0] else not left
        m = evaluate_set(images, refs)
        out[f"beta={beta:g}"] = {"on_steered_side": round(on_side / max(found, 1), 4), "objects": found,
                                 **{k: round(m[k], 4) for k in ("presence", "colour_binding", "object_recall")}}
    return out


def _shape_counts(images: list[np.ndarray], item: dict, counts: dict[str, int]) -> None:
    from attnctl.toyworld.evaluate import detect_objects

    shape_of = {o["colour"]: o["shape"] for o in item["objects"]}
    for im in images:
        for obj in detect_objects(im):
            if obj.colour not in shape_of:
                continue
            if obj.shape == shape_of[obj.colour]:
                counts["right shape"] += 1
            elif obj.shape == "unknown":
                counts["no shape"] += 1
            elif obj.shape in shape_of.values():
                counts["the other object's shape"] += 1
            else:
                counts["a shape not in the prompt"] += 1


def _unmixed(pipe, item: dict, emb: dict[str, torch.Tensor], length: int) -> dict[str, torch.Tensor]:
    """``emb`` with each object's word tokens taken from its own single-object prompt (every segment)."""
    from attnctl.layout import layout_for_pipeline

    n_text = emb["prompt_embeds"].shape[1]
    where = layout_for_pipeline(pipe, item["prompt"], n_text, (1, 1))
    tokens = emb["prompt_embeds"].clone()
    for obj in item["objects"]:
        alone = f"a {obj['colour']} {obj['shape']}"
        theirs = _embed(pipe, alone, length)["prompt_embeds"]
        there = layout_for_pipeline(pipe, alone, n_text, (1, 1))
        for seg, seg_alone in zip(where.segments, there.segments, strict=True):
            for word in (obj["colour"], obj["shape"]):
                for a, b in zip(seg.words[word], seg_alone.words[word], strict=False):
                    tokens[:, seg.start + a] = theirs[:, seg_alone.start + b]
    return {**emb, "prompt_embeds": tokens}


def shape_errors(pipe, items: list[dict], plain: list[list[np.ndarray]], seeds: range,
                 call: dict[str, Any]) -> dict[str, dict[str, float]]:
    names = ["objects of a prompted colour"]
    if hasattr(pipe, "text_encoder_3"):
        names.append("…with unmixed noun tokens")
    counts = {name: dict.fromkeys(("right shape", "the other object's shape", "a shape not in the prompt",
                                   "no shape"), 0) for name in names}
    length = call["max_sequence_length"]
    for i, item in enumerate(items):
        _shape_counts(plain[i], item, counts[names[0]])
        if len(names) > 1:
            emb = _unmixed(pipe, item, _embed(pipe, item["prompt"], length), length)
            _shape_counts(_from_embeddings(pipe, emb, _seeds(i, seeds), call), item, counts[names[1]])
    rows = {}
    for name, c in counts.items():
        total = max(sum(c.values()), 1)
        rows[name] = {k: round(v / total, 4) for k, v in c.items()} | {"n": total}
    return rows


@contextmanager
def weakened_keys(pipe, prompt: str, words: list[str], scale: float, sd3_cfg: bool, n_text: int):
    """While active, every block's keys of ``words``' text tokens are multiplied by ``scale`` on the conditional
    rows, so each image query's logit on them is ``scale`` times its own: a model that under-attends the words
    (their values, and so what the words say, are untouched). Hooked after the key's norm where there is one."""
    from attnctl.layout import layout_for_pipeline

    cols_for: dict[int, list[int]] = {}

    def hook(module, inputs, output):
        text = output.shape[1] if module_is_text[module] else n_text
        if text not in cols_for:
            where = layout_for_pipeline(pipe, prompt, text, (1, 1))
            cols_for[text] = [seg.start + p for seg in where.segments for w in words for p in seg.words.get(w, ())]
        cols = cols_for[text]
        rows = slice(output.shape[0] // 2, None) if sd3_cfg else slice(None)
        output = output.clone()
        output[rows, cols] *= scale
        return output

    module_is_text: dict[torch.nn.Module, bool] = {}
    for block in [*pipe.transformer.transformer_blocks, *getattr(pipe.transformer, "single_transformer_blocks", [])]:
        attn = block.attn
        if getattr(attn, "add_k_proj", None) is not None:  # joint block: the text stream's own key projection
            module_is_text[attn.norm_added_k if attn.norm_added_k is not None else attn.add_k_proj] = True
        else:  # FLUX single block: one sequence, text first
            module_is_text[attn.norm_k] = False
    handles = [m.register_forward_hook(hook) for m in module_is_text]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def neglect(pipe, items: list[dict], seeds: range, call: dict[str, Any], scales: list[float],
            configs: list[dict]) -> dict[str, dict[str, float]]:
    from attnctl import AttentionRegulation
    from attnctl.toyworld.evaluate import detect_objects, evaluate_set

    sd3_cfg = hasattr(pipe, "text_encoder_3") and call.get("guidance_scale", 1.0) > 1.0
    out = {}
    for scale in scales:
        for cfg in [None, *configs]:
            images, refs, colour_found, object_found = [], [], 0, 0
            for i, item in enumerate(items):
                second = item["objects"][1]
                controls = None
                if cfg is not None:
                    controls = [AttentionRegulation(**{"targets": object_words(item, "phrases"), **cfg})]
                with weakened_keys(pipe, item["prompt"], [second["colour"], second["shape"]], scale, sd3_cfg,
                                    call["max_sequence_length"]):
                    ims, _ = generate(pipe, item["prompt"], _seeds(i, seeds), call, controls)
                images.extend(ims)
                refs.extend([item] * len(seeds))
                for im in ims:
                    objs = detect_objects(im)
                    colour_found += any(o.colour == second["colour"] for o in objs)
                    object_found += any(o.colour == second["colour"] and o.shape == second["shape"] for o in objs)
            m = evaluate_set(images, refs)
            name = f"s={scale:g} · " + ("no control" if cfg is None else json.dumps(cfg, sort_keys=True))
            out[name] = {"second colour found": round(colour_found / len(images), 4),
                         "second object found": round(object_found / len(images), 4),
                         **{k: round(m[k], 4) for k in ("presence", "colour_binding", "object_recall")}}
    return out


def _object_isolation(phrases: list[str], **kwargs):
    """A control that keeps each phrase's text tokens from attending to the other phrases' tokens (−∞ on those
    text→text logits, every selected site, conditional rows): diagnostic 6's intervention."""
    from attnctl.controls.base import Control, ControlConfig
    from attnctl.processors.contributions import DenseBias, Selection

    class IsolationConfig(ControlConfig):
        targets: list[str]
        sites: str = "all"

    class ObjectTokenIsolation(Control):
        kind = "object_token_isolation"
        Config = IsolationConfig

        def begin_run(self, state):
            self._bias = {}  # (layout, text slice, sequence length) -> the bias, built once per run

        def _text_bias(self, lay, text: slice, seq_len: int, device) -> torch.Tensor:
            key = (id(lay), text.start, text.stop, seq_len)
            if key not in self._bias:
                groups = [[seg.start + p for seg in lay.segments for w in phrase.split() for p in seg.words.get(w, ())]
                          for phrase in self.config.targets]
                bias = torch.zeros(text.stop - text.start, seq_len, device=device)
                for i, own in enumerate(groups):
                    others = [text.start + p for j, g in enumerate(groups) if j != i for p in g]
                    if own and others:
                        bias[torch.tensor(own)[:, None], torch.tensor(others)[None, :]] = float("-inf")
                self._bias[key] = bias[None, :, None, :]
            return self._bias[key]

        def contribute(self, call, q, k, v, state):
            if call.n_text is None or call.n_image == 0:
                return []
            text = call.text_slice()
            out = []
            for lay, rows, _ in state.rows_by_prompt(["cond"], call.batch, q.device):
                bias = self._text_bias(lay, text, call.seq_len, q.device)
                out.append(DenseBias(fn=lambda r0, r1, b=bias, o=text.start: b[:, r0 - o:r1 - o],
                                     where=Selection(batch=rows, rows=text)))
            return out

    return ObjectTokenIsolation(targets=phrases, **kwargs)


def text_isolation(pipe, items: list[dict], plain: list[list[np.ndarray]], seeds: range, call: dict[str, Any],
                   configs: list[dict]) -> dict[str, dict[str, float]]:
    from attnctl import AttentionRegulation
    from attnctl.toyworld.evaluate import evaluate_set

    out = {}
    refs = [item for item in items for _ in seeds]
    for isolate in (False, True):
        for cfg in [None, *configs]:
            if not isolate and cfg is None:
                images = [im for ims in plain for im in ims]
            else:
                images = []
                for i, item in enumerate(items):
                    phrases = object_words(item, "phrases")
                    controls = [_object_isolation(phrases)] if isolate else []
                    if cfg is not None:
                        controls.append(AttentionRegulation(**{"targets": phrases, **cfg}))
                    images.extend(generate(pipe, item["prompt"], _seeds(i, seeds), call, controls)[0])
            m = evaluate_set(images, refs)
            regulation = "no regulation" if cfg is None else json.dumps(cfg, sort_keys=True)
            name = ("isolated · " if isolate else "") + regulation
            out[name] = {k: round(m[k], 4) for k in ("presence", "colour_binding", "object_recall", "shape_accuracy")}
    return out


def print_tables(result: dict[str, Any]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        return
    for title, key in (("which path carries the prompt (scored against …)", "which_path"),
                       ("fixed left/right bias on the objects' words", "steering"),
                       ("the shapes of the objects (no control)", "shape_errors"),
                       ("injected neglect of the second object's words", "neglect"),
                       ("objects' tokens isolated in the text stream", "text_isolation")):
        if key not in result:
            continue
        rows = result[key]
        t = Table(title=f"{result['model']} · {title}")
        cols = list(next(iter(rows.values())))
        t.add_column("")
        for c in cols:
            t.add_column(c, justify="right")
        for name, row in rows.items():
            t.add_row(name, *(f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c]) for c in cols))
        Console(width=160).print(t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="toy-sd3")
    ap.add_argument("--seeds", type=positive_int, default=4)
    ap.add_argument("--first-seed", type=int, default=0,
                    help="seeds first-seed … first-seed+seeds−1 (confirm a finding on other seeds)")
    ap.add_argument("--limit", type=positive_int, default=None, help="only the first N pair prompts")
    ap.add_argument("--betas", type=float, nargs="+", default=[1.0, 3.0])
    ap.add_argument("--sites", default="mid")
    ap.add_argument("--steps", default="window(1, 0, 0.5)")
    ap.add_argument("--true-cfg", type=float, default=None,
                    help="FLUX: true CFG at this scale against the empty prompt (steering only)")
    ap.add_argument("--threads", type=positive_int, default=2)
    ap.add_argument("--plus-only", action="store_true",
                    help="steering: +β on each word's own side only (no −β on the other side)")
    ap.add_argument("--bias-scope", choices=["joint", "text"], default="joint",
                    help="steering: the bias acts in the joint softmax, or inside the text attention only (each "
                         "image token keeps its total text attention)")
    ap.add_argument("--neglect-scales", type=float, nargs="+", default=[1.0, 0.5, 0.25],
                    help="scales of the second object's word tokens (neglect diagnostic; 1: none injected)")
    ap.add_argument("--configs", nargs="+", default=["{}"],
                    help="AttentionRegulation settings (JSON) of the neglect and text-isolation diagnostics")
    ap.add_argument("--only", nargs="+", choices=[*DIAGNOSTICS],
                    help="run only these diagnostics [default: all]")
    ap.add_argument("--json")
    args = ap.parse_args()
    only = set(args.only or DIAGNOSTICS)
    if args.true_cfg is not None and only != {"steering"}:
        ap.error("--true-cfg works with --only steering (the other diagnostics run the model without it)")
    torch.set_num_threads(args.threads)
    from attnctl.toyworld.models import load_pipeline
    from attnctl.toyworld.world import prompt_set

    pipe = load_pipeline(args.model)
    call = call_kwargs(pipe, None, args.true_cfg)
    items = prompt_set("pair")[: args.limit]
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    plain = plain_images(pipe, items, seeds, call) if only - {"neglect"} else []
    result = {"model": args.model, "items": len(items), "seeds": [seeds.start, seeds.stop - 1], "sites": args.sites,
              "steps": args.steps, "true_cfg": args.true_cfg, "bias_scope": args.bias_scope}
    if "which_path" in only:
        result["which_path"] = which_path(pipe, items, plain, seeds, call)
    if "steering" in only:
        result["steering"] = steering(pipe, items, plain, seeds, call, args.betas, args.sites, args.steps,
                                      args.plus_only, args.bias_scope)
    if "shape_errors" in only:
        result["shape_errors"] = shape_errors(pipe, items, plain, seeds, call)
    configs = [json.loads(c) for c in args.configs]
    if "neglect" in only:
        result["neglect"] = neglect(pipe, items, seeds, call, args.neglect_scales, configs)
    if "text_isolation" in only:
        result["text_isolation"] = text_isolation(pipe, items, plain, seeds, call, configs)
    print_tables(result)
    emit(result, args.json)


if __name__ == "__main__":
    main()
