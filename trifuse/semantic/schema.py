"""The description schema shared by every describer (OpenAI, offline) and by CLIP.

A :class:`Description` holds one :class:`ViewDescription` per view (axial, coronal,
sagittal). Both are pydantic v2 models: a vision model's JSON answer is validated
against them, and the offline describer builds them directly.

The OpenAI structured-output schema (:func:`openai_response_format`) is derived from
the same model, made *strict-compatible* (every object ``additionalProperties: false``,
every property required, keywords that strict mode rejects removed); the bounds that
are removed there (e.g. ``size_mm >= 0``) are still enforced when the answer is
validated with pydantic.
"""
from __future__ import annotations

import copy
from typing import Any, Literal, Union, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

View = Literal["axial", "coronal", "sagittal"]
Hemisphere = Literal["left", "right", "bilateral", "midline", "none"]
Lobe = Literal["frontal", "parietal", "temporal", "occipital", "insular", "deep", "cerebellum", "brainstem"]
Enhancement = Literal["none", "nodular", "ring", "heterogeneous"]
Oedema = Literal["none", "mild", "moderate", "marked"]
Source = Literal["openai", "offline"]

VIEWS: tuple[str, ...] = get_args(View)  #: view order used everywhere
HEMISPHERES: tuple[str, ...] = get_args(Hemisphere)
LOBES: tuple[str, ...] = get_args(Lobe)  #: canonical lobe order
ENHANCEMENTS: tuple[str, ...] = get_args(Enhancement)
OEDEMA_GRADES: tuple[str, ...] = get_args(Oedema)

#: JSON-schema keywords that OpenAI strict structured outputs do not accept (or accept
#: only on some models); they are dropped from the request schema and enforced by pydantic.
_STRICT_UNSUPPORTED = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf",
                       "minLength", "maxLength", "pattern", "format", "minItems", "maxItems",
                       "uniqueItems", "default", "title", "examples")


class ViewDescription(BaseModel):
    """Structured radiological description of the abnormality on one view's slice.

    Attributes:
        view: plane of the slice.
        hemisphere: side of the abnormality (subject's left/right, not the viewer's).
        lobes: lobes/regions the abnormality involves, most involved first, no repeats.
        size_mm: longest in-plane diameter of the whole abnormal region (including
            oedema), in mm; 0 when there is no abnormality.
        enhancement: post-contrast (T1ce) pattern.
        necrosis: a non-enhancing, T2-bright core inside the lesion is present.
        oedema: perilesional FLAIR-hyperintense oedema grade.
        mass_effect: sulcal effacement, ventricular compression or midline shift.
        impression: one or two sentences of free-text impression.
    """

    model_config = ConfigDict(
        extra="forbid", frozen=True,
        json_schema_extra={"description": "Radiological description of the brain abnormality on one MRI slice."},
    )

    view: View = Field(description="Plane of the slice.")
    hemisphere: Hemisphere = Field(
        description="Side of the abnormality in the SUBJECT's frame (not the viewer's); 'none' if no abnormality.")
    lobes: list[Lobe] = Field(description="Lobes or regions involved, most involved first; empty if none.")
    size_mm: float = Field(ge=0.0, le=400.0, description=(
        "Longest in-plane diameter in mm of the whole abnormal region including oedema; 0 if none."))
    enhancement: Enhancement = Field(description="Enhancement pattern on post-contrast T1 (T1ce).")
    necrosis: bool = Field(description="A non-enhancing, T2-bright necrotic core is present inside the lesion.")
    oedema: Oedema = Field(description="Grade of perilesional FLAIR-hyperintense oedema.")
    mass_effect: bool = Field(description="Sulcal effacement, ventricular compression or midline shift.")
    impression: str = Field(min_length=1, max_length=2000, description="One or two sentences of impression.")

    @field_validator("lobes")
    @classmethod
    def _unique_lobes(cls, v: list[str]) -> list[str]:
        # A model may repeat a lobe; keep the first mention (order = importance).
        return list(dict.fromkeys(v))

    @field_validator("impression")
    @classmethod
    def _strip(cls, v: str) -> str:
        v = " ".join(v.split())
        if not v:
            raise ValueError("impression is empty")
        return v


class SliceRef(BaseModel):
    """Which slice a view description was made from (for pairing slices with text).

    Attributes:
        index: slice index along ``axis`` in the cached (cropped) sample grid.
        index_original: the same in the original full-volume grid.
        axis: array axis (0, 1, 2 of D, H, W) normal to the view.
        image_hash: hash of the rendered image the describer saw.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    index: int
    index_original: int
    axis: int = Field(ge=0, le=2)
    image_hash: str


class Description(BaseModel):
    """A case's description: one :class:`ViewDescription` per view.

    Attributes:
        case_id: case identifier (BraTS folder name).
        views: view name → description; keys must match each value's ``view``.
        source: which describer produced it.
        model: model name (e.g. ``gpt-4o``) or the offline describer's version tag.
        prompt_version: prompt (or offline rule-set) version; part of the cache key.
        prompt_hash: sha256 prefix of the prompt text and response schema (OpenAI) or of
            the rule thresholds (offline); with ``source``, ``model`` and
            ``prompt_version`` it is the describer identity
            (:mod:`trifuse.semantic.provenance`). Empty in records made before it existed.
        slices: view → the slice each view description was made from (optional).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    case_id: str = Field(min_length=1)
    views: dict[View, ViewDescription]
    source: Source
    model: str
    prompt_version: str
    prompt_hash: str = ""
    slices: dict[View, SliceRef] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _views_consistent(self) -> "Description":
        for name, vd in self.views.items():
            if vd.view != name:
                raise ValueError(f"views[{name!r}] describes view {vd.view!r}")
        return self

    def ordered_views(self) -> list[ViewDescription]:
        """Views in the canonical order :data:`VIEWS` (missing ones skipped)."""
        return [self.views[v] for v in VIEWS if v in self.views]


# --------------------------------------------------------------------------------------
# OpenAI structured output
# --------------------------------------------------------------------------------------
def _strictify(node: Any) -> Any:
    """Recursively make a JSON schema acceptable to OpenAI strict mode."""
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if k in ("properties", "$defs"):  # maps of names → schemas: keep every name
                out[k] = {name: _strictify(sub) for name, sub in v.items()}
            elif k not in _STRICT_UNSUPPORTED:
                out[k] = _strictify(v)
        if out.get("type") == "object" or "properties" in out:
            props = out.get("properties", {})
            out["additionalProperties"] = False
            out["required"] = list(props)
        return out
    if isinstance(node, list):
        return [_strictify(v) for v in node]
    return node


def strict_json_schema(model: type[BaseModel] = ViewDescription) -> dict[str, Any]:
    """JSON schema of ``model`` made strict-compatible for OpenAI structured output.

    Args:
        model: a pydantic model whose fields are all fixed-name (no free ``dict`` keys).

    Returns:
        A JSON-schema ``dict`` with ``additionalProperties: false`` and every property
        required on every object; ``$defs``/``$ref`` are kept (strict mode allows them).
    """
    return _strictify(model.model_json_schema())


def openai_response_format(view: str | None = None, name: str = "view_description") -> dict[str, Any]:
    """The ``response_format`` argument for ``chat.completions.create``.

    Args:
        view: when given, the schema's ``view`` enum is narrowed to this one value so
            the model cannot answer for another plane.
        name: schema name sent to the API.

    Returns:
        ``{"type": "json_schema", "json_schema": {"name", "schema", "strict": True}}``.
    """
    schema = copy.deepcopy(strict_json_schema(ViewDescription))
    if view is not None:
        if view not in VIEWS:
            raise ValueError(f"unknown view {view!r}; expected one of {VIEWS}")
        schema["properties"]["view"]["enum"] = [view]
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


# --------------------------------------------------------------------------------------
# Canonical text for text encoders
# --------------------------------------------------------------------------------------
_ENH_TEXT = {
    "none": "no enhancement",
    "nodular": "nodular enhancement",
    "ring": "ring enhancement",
    "heterogeneous": "heterogeneous enhancement",
}


def _join(items: list[str]) -> str:
    if len(items) <= 1:
        return "".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]


def _location(vd: ViewDescription) -> str:
    side = {"left": "left", "right": "right", "bilateral": "bilateral", "midline": "midline", "none": ""}[vd.hemisphere]
    lobes = [("deep grey matter" if lobe == "deep" else lobe) for lobe in vd.lobes]
    words = [w for w in (side, _join(lobes)) if w]
    return " ".join(words)


def view_text(vd: ViewDescription, include_impression: bool = False) -> str:
    """One canonical sentence for one view, built only from the structured fields.

    Example: ``"Axial view: a 42 mm left frontal and insular lesion with ring
    enhancement, necrosis, moderate oedema and mass effect."``

    Args:
        vd: the view description.
        include_impression: append the free-text impression (model-dependent wording;
            off by default so the text is a deterministic function of the fields).
    """
    head = f"{vd.view.capitalize()} view:"
    if vd.hemisphere == "none" and vd.size_mm <= 0:
        text = f"{head} no focal abnormality."
    else:
        loc = _location(vd)
        size = f"{vd.size_mm:.0f} mm "
        lesion = f"a {size}{loc + ' ' if loc else ''}lesion"
        feats = [_ENH_TEXT[vd.enhancement]]
        if vd.necrosis:
            feats.append("necrosis")
        feats.append("no oedema" if vd.oedema == "none" else f"{vd.oedema} oedema")
        feats.append("mass effect" if vd.mass_effect else "no mass effect")
        text = f"{head} {lesion} with {_join(feats)}."
    if include_impression:
        text = f"{text} {vd.impression}"
    return text


def to_text(description: Union[Description, ViewDescription], view: str | None = None,
            include_impression: bool = False) -> str:
    """Canonical text of a description, for text encoders (CLIP, MiniLM).

    Args:
        description: a case :class:`Description` or a single :class:`ViewDescription`.
        view: with a :class:`Description`, return only this view's sentence; ``None``
            joins the sentences of all views in the order :data:`VIEWS`.
        include_impression: append each view's free-text impression.

    Returns:
        The text; identical fields give identical text.

    Raises:
        KeyError: ``view`` is not in the description.
    """
    if isinstance(description, ViewDescription):
        return view_text(description, include_impression)
    if view is not None:
        return view_text(description.views[view], include_impression)  # type: ignore[index]
    return " ".join(view_text(vd, include_impression) for vd in description.ordered_views())
