"""Attention sites of a transformer, and selectors over sites and heads.

A *site* is one attention module with a stable name (its module path, e.g. ``transformer_blocks.13.attn``)
and an index ``L`` in the model's ordered list of attention sites. Heads are ``0..H-1``. Selectors never
match by substring: ``transformer_blocks.1`` names block 1 only, never block 10.

Selector grammar (strings; a list of them selects the union):

- ``"all"`` or ``"*"``: every site;
- ``"transformer_blocks.3.attn"``: one site by exact name;
- ``"transformer_blocks.3"``: every site inside block 3 (``attn`` and, on SD3.5, ``attn2``);
- ``"transformer_blocks.2:6"``: blocks 2, 3, 4, 5 (a Python slice over block indices, open end allowed);
- ``"L13"`` / ``"L4:8"``: sites by index in the model's site list;
- ``"re:<pattern>"``: sites whose full name matches the regular expression (anchored at both ends);
- ``"kind:flux_single"``: every site of one kind (``sd3_joint``, ``sd3_image``, ``flux_double``, ``flux_single``).

Heads use ``LxHy`` notation: ``"L13H7"``, ``"L13H0:4"``, or a site selector followed by ``/H`` ranges,
e.g. ``"transformer_blocks.3.attn/H1,5"``.
"""

from __future__ import annotations

import json
import numbers
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from .errors import SiteError

SiteKind = Literal["sd3_joint", "sd3_image", "flux_double", "flux_single"]


@dataclass(frozen=True)
class Site:
    """One attention module of a transformer."""

    name: str
    index: int
    kind: SiteKind
    heads: int
    head_dim: int

    @property
    def family(self) -> str:
        return "flux" if self.kind.startswith("flux") else "sd3"

    @property
    def processor_key(self) -> str:
        """The key ``set_attn_processor`` expects for this site."""
        return f"{self.name}.processor"

    @property
    def block(self) -> tuple[str, int]:
        """``("transformer_blocks", 3)`` for ``transformer_blocks.3.attn``."""
        stack, idx, _ = self.name.split(".", 2)
        return stack, int(idx)

    @property
    def label(self) -> str:
        return f"L{self.index}"


def _site_kind(name: str, module: torch.nn.Module) -> SiteKind:
    cls = type(module).__name__
    if cls == "FluxAttention" or name.startswith("single_transformer_blocks."):
        return "flux_single" if name.startswith("single_transformer_blocks.") else "flux_double"
    if cls == "Attention":
        return "sd3_image" if name.endswith(".attn2") else "sd3_joint"
    raise SiteError(
        f"attention module {name!r} is a {cls}, which attnctl does not know. attnctl supports SD3/SD3.5 "
        "(Attention in transformer_blocks) and FLUX.1 (FluxAttention); pass an SD3 or FLUX transformer."
    )


def list_sites(transformer: torch.nn.Module) -> list[Site]:
    """Every attention site of an SD3 / SD3.5 / FLUX transformer, in the order of ``attn_processors``."""
    transformer = uncompiled(transformer)
    if not hasattr(transformer, "attn_processors"):
        raise SiteError(
            f"{type(transformer).__name__} has no `attn_processors`; pass a diffusers transformer "
            "(pipe.transformer) or a pipeline."
        )
    sites = []
    for key in transformer.attn_processors:
        name = key[: -len(".processor")]
        module = transformer.get_submodule(name)
        heads = int(module.heads)
        inner = module.to_q.out_features
        if heads < 1 or inner % heads:
            raise SiteError(f"{name} has {heads} attention heads for {inner} channels; a model's config must give "
                            "at least one head, dividing its channels (num_attention_heads, attention_head_dim)")
        sites.append(Site(name, len(sites), _site_kind(name, module), heads, inner // heads))
    return sites


def uncompiled(module: torch.nn.Module) -> torch.nn.Module:
    """The module itself, or the one a ``torch.compile(module)`` wrapper compiles. attnctl installs processors and
    forward wrappers on that module; the compiled wrapper calls into it, so both see them."""
    inner = getattr(module, "_orig_mod", None)
    return uncompiled(inner) if isinstance(inner, torch.nn.Module) else module


def family_of(transformer: torch.nn.Module) -> str:
    """"sd3" or "flux", from the transformer class (through a ``torch.compile`` wrapper)."""
    cls = type(uncompiled(transformer)).__name__
    if cls.startswith("SD3"):
        return "sd3"
    if cls.startswith("Flux"):
        return "flux"
    raise SiteError(f"{cls} is neither an SD3 nor a FLUX transformer; attnctl supports SD3Transformer2DModel "
                    "and FluxTransformer2DModel.")


# ----------------------------------------------------------------------------------------------- selectors

_SLICE = re.compile(r"^(-?\d*):(-?\d*)$")
_HEADS = re.compile(r"^L(\d+)H(\d+(?::\d*)?(?:,\d+(?::\d*)?)*)$")


def _parse_slice(text: str, what: str) -> slice:
    m = _SLICE.match(text)
    if not m:
        raise SiteError(f"{what}: {text!r} is not a range; write start:stop, e.g. 2:6")
    a, b = (int(x) if x else None for x in m.groups())
    return slice(a, b)


def _in_range(s: slice, n: int, text: str, what: str) -> slice:
    """``s`` when its bounds lie within ``0..n``: a range past the end (a preset made for a deeper model, a typo) is
    refused as an index past the end is, not cut short."""
    if all(bound is None or bound <= n for bound in (s.start, s.stop)):
        return s
    start = s.start or 0
    fix = (f"write '{start}:' for every index from {start} to the end" if start < n
           else f"give indices from 0 to {n - 1}")
    raise SiteError(f"{what}: range {text!r} reaches past the last index, {n - 1}", fix=fix)


def _indices(spec: str, n: int, what: str) -> list[int]:
    """Parse ``"7"``, ``"0:4"``, ``"1,5,8:10"`` into indices < n, with errors naming the bad part."""
    out: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        if ":" in part:
            idx = list(range(n))[_in_range(_parse_slice(part, what), n, part, what)]
            if not idx:
                raise SiteError(f"{what}: range {part!r} is empty (valid indices are 0..{n - 1})")
            out.extend(idx)
        else:
            if not part.lstrip("-").isdigit():
                raise SiteError(f"{what}: {part!r} is not an index")
            i = int(part)
            if not 0 <= i < n:
                raise SiteError(f"{what}: index {i} is out of range; valid indices are 0..{n - 1}")
            out.append(i)
    return sorted(set(out))


def _match_one(sites: Sequence[Site], sel: str) -> list[Site]:
    sel = sel.strip()
    if sel in ("all", "*"):
        return list(sites)
    if sel.startswith("re:"):
        try:
            pat = re.compile(sel[3:])
        except re.error as e:
            raise SiteError(f"selector {sel!r}: invalid regular expression ({e})") from None
        return [s for s in sites if pat.fullmatch(s.name)]
    if sel.startswith("kind:"):
        kinds = {s.kind for s in sites}
        if sel[5:] not in {"sd3_joint", "sd3_image", "flux_double", "flux_single"}:
            raise SiteError(f"selector {sel!r}: unknown kind; use one of sd3_joint, sd3_image, flux_double, "
                            "flux_single")
        if sel[5:] not in kinds:
            return []
        return [s for s in sites if s.kind == sel[5:]]
    if re.fullmatch(r"L[\d:,]+", sel):
        return [sites[i] for i in _indices(sel[1:], len(sites), f"selector {sel!r}")]
    by_name = {s.name: s for s in sites}
    if sel in by_name:
        return [by_name[sel]]
    stack, _, rest = sel.partition(".")
    stacks = {s.block[0] for s in sites}
    if stack in stacks and rest:
        blocks = sorted({s.block[1] for s in sites if s.block[0] == stack})
        if rest.isdigit():
            wanted = {int(rest)}
        elif _SLICE.match(rest):
            what = f"selector {sel!r}"
            wanted = set(range(max(blocks) + 1)[_in_range(_parse_slice(rest, what), max(blocks) + 1, rest, what)])
        else:
            wanted = set()
        if wanted:
            return [s for s in sites if s.block[0] == stack and s.block[1] in wanted]
    return []


def select_sites(sites: Sequence[Site], selectors: str | Iterable[str]) -> list[Site]:
    """Sites matched by one selector or the union of several, in model order.

    Every selector must match at least one site: a selector that matches nothing is a mistake (a typo, a
    preset made for another model) and raises :class:`SiteError` listing what exists.
    """
    if isinstance(selectors, str):
        selectors = [selectors]
    selectors = list(selectors)
    if not selectors:
        raise SiteError("the site selection is an empty list, which selects no site",
                        fix="give 'all', a named set such as 'mid', or selectors such as ['L3', 'L5:8']")
    chosen: dict[int, Site] = {}
    for sel in selectors:
        if not isinstance(sel, str):
            raise SiteError(f"site selector {sel!r} is not a string; see attnctl.sites for the grammar")
        found = _match_one(sites, sel)
        if not found:
            examples = ", ".join(s.name for s in sites[:3])
            raise SiteError(
                f"site selector {sel!r} matches no attention site of this model ({len(sites)} sites, e.g. "
                f"{examples}). Use `attnctl inspect` to list them; selectors are exact names, block "
                "numbers or ranges, L-indices, 're:<regex>' (anchored) or 'kind:<kind>'."
            )
        for s in found:
            chosen[s.index] = s
    return [chosen[i] for i in sorted(chosen)]


# ----------------------------------------------------------------------------------------------- head sets


@dataclass(frozen=True)
class HeadSet:
    """A set of (site, head) pairs, stored by site *name* so it survives edits of the site list.

    ``model`` is an optional fingerprint (family, number of sites, heads per site) of the model the set was
    made for; :meth:`resolve` refuses a set whose site names or head indices do not exist in the model.
    """

    heads: dict[str, tuple[int, ...]]
    model: dict | None = None

    def __len__(self) -> int:
        return sum(len(h) for h in self.heads.values())

    def pairs(self) -> list[tuple[str, int]]:
        return [(site, h) for site, hs in self.heads.items() for h in hs]

    @classmethod
    def from_pairs(cls, pairs: Iterable[tuple[str, int]], model: dict | None = None) -> HeadSet:
        """The set of ``[(site name, head), ...]`` (duplicates merged, heads sorted per site)."""
        heads: dict[str, set[int]] = {}
        for site, h in pairs:
            heads.setdefault(site, set()).add(int(h))
        return cls({k: tuple(sorted(v)) for k, v in heads.items()}, model)

    @classmethod
    def parse(cls, sites: Sequence[Site], specs: str | Iterable[str]) -> HeadSet:
        """Parse ``"L13H7"``, ``"L2H0:4"``, ``"transformer_blocks.3.attn/H1,5"`` or a bare site selector
        (meaning all its heads)."""
        if isinstance(specs, str):
            specs = [specs]
        heads: dict[str, set[int]] = {}
        for spec in specs:
            spec = spec.strip()
            m = _HEADS.match(spec)
            if m:
                site_sel, head_spec = f"L{m.group(1)}", m.group(2)
            elif "/H" in spec:
                site_sel, head_spec = spec.split("/H", 1)
            else:
                site_sel, head_spec = spec, None
            for site in select_sites(sites, site_sel):
                hs = (
                    range(site.heads)
                    if head_spec is None
                    else _indices(head_spec, site.heads, f"heads of {site.name} in {spec!r}")
                )
                heads.setdefault(site.name, set()).update(hs)
        return cls({k: tuple(sorted(v)) for k, v in heads.items()}, model_fingerprint(sites))

    def resolve(self, sites: Sequence[Site]) -> dict[Site, tuple[int, ...]]:
        """Map to the given model's sites, raising a clear error for anything that does not exist."""
        by_name = {s.name: s for s in sites}
        fp, ours = self.model or {}, model_fingerprint(sites)
        fix = "use a preset searched on this model (attnctl headhunt), or select heads with attnctl.HeadSet.parse on it"
        if fp.get("family") and sites and fp["family"] != ours["family"]:
            raise SiteError(f"head set was made for a {fp['family']} model and this is a {ours['family']} model",
                            fix=fix)
        if sites and any(fp.get(k) is not None and fp[k] != ours[k] for k in ("sites", "heads")):
            # the same family, another size: a toy's heads would be applied to a real model's first layers
            raise SiteError(
                f"head set was made for a {fp.get('family', '?')} model with {fp.get('sites')} attention sites of "
                f"{'/'.join(map(str, fp.get('heads') or ['?']))} heads, and this one has {ours['sites']} sites of "
                f"{'/'.join(map(str, ours['heads']))} heads", fix=fix)
        missing = [n for n in self.heads if n not in by_name]
        if missing:
            raise SiteError(
                f"head set names {len(missing)} site(s) this model does not have (e.g. {missing[0]!r}); it was "
                f"made for a model with {fp.get('sites', '?')} sites ({fp.get('family', '?')}), this one has "
                f"{len(sites)}. Use a preset made for this model (attnctl.HeadSet.parse and .save make one)."
            )
        out = {}
        for name, hs in self.heads.items():
            site = by_name[name]
            bad = [h for h in hs if not 0 <= h < site.heads]
            if bad:
                raise SiteError(f"head set: {name} has heads 0..{site.heads - 1}, but the set names {bad}")
            out[site] = tuple(hs)
        return out

    def to_json(self) -> dict:
        return {"heads": {k: list(v) for k, v in self.heads.items()}, "model": self.model}

    @classmethod
    def from_json(cls, data: dict) -> HeadSet:
        if not isinstance(data, dict) or not isinstance(data.get("heads"), dict):
            raise SiteError("a head-set preset is a JSON object {\"heads\": {site name: [head, ...]}, ...}")
        return cls({k: head_numbers(k, v) for k, v in data["heads"].items()}, data.get("model"))

    def save(self, path: str | Path) -> None:
        from .io import atomic_write_text

        atomic_write_text(Path(path), json.dumps(self.to_json(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> HeadSet:
        return cls.from_json(json.loads(Path(path).read_text()))


def head_numbers(site: str, heads: Any) -> tuple[int, ...]:
    """The heads listed for ``site`` in a head set's JSON, sorted: a list of whole numbers from 0. Anything else (a
    bare number, a fraction, a flag, a quoted number, null) is refused rather than read as some other head."""
    if not isinstance(heads, (list, tuple)) or not all(
            isinstance(h, numbers.Integral) and not isinstance(h, bool) and h >= 0 for h in heads):
        raise SiteError(f"the heads of {site!r} are {heads!r}, not a list of head numbers",
                        fix=f'write them as a list of whole numbers from 0, e.g. {{"{site}": [0, 2]}}')
    return tuple(sorted({int(h) for h in heads}))


def model_fingerprint(sites: Sequence[Site]) -> dict:
    return {
        "family": sites[0].family if sites else None,
        "sites": len(sites),
        "heads": sorted({s.heads for s in sites}),
    }
