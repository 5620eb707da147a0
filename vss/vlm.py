"""Post-processing of ambiguous classes by a multimodal LLM (MVC paper section 2.5 and the
"post processing" ablation of section 3.3, Tab. 5).

Some classes are hard to tell apart from pixels but easy from the whole scene (the paper's
example: is the water a river, a lake or the sea?). Such classes form a group with a generic
name (``vss/vlm_groups.json``: ``[{"name", "stuff", "classes": [...]}]``). For a video whose
prediction holds any class of a group, the region = the pixels of every frame labelled with any
member class. A few frames where the region is largest are sent, with the region outlined, to an
OpenAI-compatible chat API with the paper's prompt

    "Is the {stuff} in the image a {class1, class2 or class3}? Please give me the only answer."

and the whole region, in every frame, is relabelled to the one class the answer names.

Readings and choices (the paper gives only the prompt and the example):
- The class list is written as in the paper's example ("a river, lake or sea"); class names are
  shown lower-case with "_" as spaces and "_or_" as "/" (VSPW's "ship_or_boat" -> "ship/boat").
- Marking: the region's outline is drawn in magenta on the full frame, not a crop, because the
  context (shore, bridges, horizon) is what separates the classes; frames are downscaled to at
  most ``max_image_side`` pixels before drawing so the outline stays visible.
- Representative frames: up to ``frames_per_query`` frames with the largest region (earlier
  frame on ties), sent in temporal order in one request.
- Parsing: lower-case, "_"/"-" as spaces, whole-word match of each member class (each "_or_"
  alternative, singular or plural). Exactly one member class mentioned -> that class; none or
  several (e.g. the question echoed back, "not a river but a lake") -> no change and a warning.
- Failures (timeouts, connection errors, HTTP errors, malformed responses, unusable answers)
  leave the labels unchanged with a ``RuntimeWarning``. Timeouts, connection errors, 429 and 5xx
  are retried ``retries`` times with exponential backoff; other 4xx are not. The SDK's own retries
  are switched off so that ``retries`` is the only retry count.
- Cache: every answer received (usable or not) is stored as JSON in ``cache_dir``, keyed by a
  hash of video, model, group, chosen frames and region pixel count; a cached answer sends no
  request. Failures are not cached, so a rerun asks again.
- The API key is never logged: warning texts are scrubbed of it (servers may echo keys in
  authentication errors).

Shipped groups: VSPW ``water`` = river / lake / sea, the paper's example and, we judge, the one
common case where a video shows a single kind of the group, so relabelling the whole region is
safe. Pairs like road/path, building/house or floor/ground were left out: scenes often hold both
at once, and whole-region relabelling would destroy a correct mixed prediction. For the same
reason no CamVid group is shipped (road/pavement, pedestrian/bicyclist co-occur in nearly every
frame); pass ``--vlm-groups FILE`` for other datasets.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
import functools
import hashlib
import json
import logging
import os
from pathlib import Path
import re
import time
from typing import Callable, Sequence
import warnings

import cv2
import numpy as np
import openai

from vss.io import atomic_path

logger = logging.getLogger(__name__)

PROMPT = "Is the {stuff} in the image a {classes}? Please give me the only answer."
OUTLINE_RGB = (255, 0, 255)
# APITimeoutError is an APIConnectionError; InternalServerError is any 5xx.
_RETRYABLE = (openai.APIConnectionError, openai.RateLimitError, openai.InternalServerError)
_KEY_PATTERN = re.compile(r"sk-[A-Za-z0-9_\-*]{4,}")


@dataclass(frozen=True)
class AmbiguityGroup:
    """Classes the segmenter confuses, with the generic word used in the prompt."""

    name: str
    stuff: str
    classes: tuple[str, ...]


def default_groups_path() -> Path:
    """The shipped VSPW groups file, ``vss/vlm_groups.json``."""
    return Path(__file__).resolve().with_name("vlm_groups.json")


def load_groups(
    path: str | os.PathLike | None = None, class_names: Sequence[str] | None = None
) -> list[AmbiguityGroup]:
    """Read and validate a groups file.

    Args:
        path: JSON list of {"name": str, "stuff": str, "classes": [>= 2 class names]};
            None = the shipped VSPW groups.
        class_names: the dataset's classes; when given every member must be one of them.

    Returns:
        The groups, in file order.

    Raises:
        FileNotFoundError: missing file. ValueError: malformed file, unknown or repeated class.
    """
    path = Path(path) if path is not None else default_groups_path()
    if not path.is_file():
        raise FileNotFoundError(f"VLM groups file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of groups")
    groups, seen = [], {}
    for i, entry in enumerate(data):
        ok = isinstance(entry, dict) and isinstance(entry.get("name"), str) and isinstance(entry.get("stuff"), str)
        classes = entry.get("classes") if isinstance(entry, dict) else None
        if not ok or not isinstance(classes, list) or len(classes) < 2 or not all(isinstance(c, str) for c in classes):
            raise ValueError(f"{path}: group {i} must be {{'name': str, 'stuff': str, 'classes': [>= 2 names]}}")
        for c in classes:
            if class_names is not None and c not in class_names:
                raise ValueError(f"{path}: class {c!r} of group {entry['name']!r} is not a class of this dataset")
            if c in seen:
                raise ValueError(f"{path}: class {c!r} is in groups {seen[c]!r} and {entry['name']!r}")
            seen[c] = entry["name"]
        groups.append(AmbiguityGroup(entry["name"], entry["stuff"], tuple(classes)))
    return groups


def display_name(class_name: str) -> str:
    """How a class is written in the prompt: "ship_or_boat" -> "ship/boat"."""
    return class_name.replace("_or_", "/").replace("_", " ").lower()


def format_prompt(group: AmbiguityGroup) -> str:
    """The paper's prompt for a group: "Is the water in the image a river, lake or sea? ..."."""
    names = [display_name(c) for c in group.classes]
    listed = ", ".join(names[:-1]) + " or " + names[-1]
    return PROMPT.format(stuff=group.stuff, classes=listed)


def _plurals(phrase: str) -> list[str]:
    words = phrase.split()
    last = words[-1]
    forms = {last, last + "s", last + "es"}
    if last.endswith("y"):
        forms.add(last[:-1] + "ies")
    return [" ".join(words[:-1] + [f]) for f in forms]


def _normalise(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", " ", text.lower().replace("_", " ").replace("-", " ")).strip()


def parse_answer(answer: str, classes: Sequence[str]) -> str | None:
    """The one member class an answer names, else None (see the module docstring's rule).

    Args:
        answer: the model's reply.
        classes: the group's class names (dataset spelling).

    Returns:
        The class name as given in ``classes``, or None when zero or several are mentioned.
    """
    text = " " + _normalise(answer) + " "
    mentioned = []
    for c in classes:
        alternatives = [_normalise(a) for a in c.lower().split("_or_")]
        forms = [f for a in alternatives if a for f in _plurals(a)]
        if any(f" {f} " in text for f in forms):
            mentioned.append(c)
    return mentioned[0] if len(mentioned) == 1 else None


def make_client(base_url: str | None = None, api_key: str | None = None, timeout: float = 60.0) -> openai.OpenAI:
    """An OpenAI-compatible client.

    Args:
        base_url: server URL, e.g. "http://localhost:8000/v1" for vLLM; None = OpenAI (or the
            ``OPENAI_BASE_URL`` environment variable, read by the SDK).
        api_key: key; None = ``OPENAI_API_KEY`` from the environment. A local server that needs
            no key still needs a non-empty string for the SDK, so with ``base_url`` set and no key
            the dummy "EMPTY" (vLLM's convention) is used.
        timeout: seconds per request.

    Returns:
        ``openai.OpenAI`` with the SDK's retries off (``correct_video`` retries itself).

    Raises:
        ValueError: no key and no base_url (the official API always needs one).
    """
    key = api_key or os.environ.get("OPENAI_API_KEY")
    if not key:
        if base_url is None:
            raise ValueError("VLM: no API key; set OPENAI_API_KEY, or pass the base URL of a local server")
        key = "EMPTY"
    return openai.OpenAI(base_url=base_url, api_key=key, timeout=timeout, max_retries=0)


def _scrub(text: str, secret: str | None) -> str:
    if secret and len(secret) >= 4:
        text = text.replace(secret, "***")
    return _KEY_PATTERN.sub("sk-***", text)


def _marked_png_url(frame: np.ndarray, region: np.ndarray, max_side: int) -> str:
    """The frame with the region's outline drawn, as a base64 PNG data URL."""
    h, w = region.shape
    scale = min(1.0, max_side / max(h, w))
    img = np.ascontiguousarray(frame[..., :3], dtype=np.uint8)
    mask = region.astype(np.uint8)
    if scale < 1.0:
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        img = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
        mask = cv2.resize(mask, size, interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(mask, cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
    thickness = max(2, round(max(img.shape[:2]) / 250))
    cv2.drawContours(img, contours, -1, OUTLINE_RGB, thickness)  # img is RGB; colour given as RGB
    ok, png = cv2.imencode(".png", cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError("VLM: PNG encoding failed")
    return "data:image/png;base64," + base64.b64encode(png.tobytes()).decode("ascii")


def _request_content(
    group: AmbiguityGroup, frames_rgb: Sequence[np.ndarray], regions: np.ndarray, max_side: int
) -> list:
    """The user message: the prompt, then one outlined image per frame."""
    parts = [{"type": "text", "text": format_prompt(group)}]
    for frame, region in zip(frames_rgb, regions):
        url = _marked_png_url(np.asarray(frame), region, max_side)
        parts.append({"type": "image_url", "image_url": {"url": url}})
    return parts


def _read_cache(path: Path) -> str | None:
    if not path.is_file():
        return None
    try:
        answer = json.loads(path.read_text(encoding="utf-8"))["answer"]
        return answer if isinstance(answer, str) else None
    except (json.JSONDecodeError, KeyError, TypeError, OSError):
        warnings.warn(f"VLM cache file {path} is unreadable; asking again", RuntimeWarning, stacklevel=3)
        return None


def _write_cache(path: Path, record: dict) -> None:
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)


def _ask(client: openai.OpenAI, model: str, content: list, timeout: float, retries: int, backoff: float) -> str:
    """One chat completion with retries; returns the reply text or raises the last error."""
    client = client.with_options(max_retries=0)
    for attempt in range(retries + 1):
        try:
            response = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": content}], timeout=timeout
            )
            try:
                answer = response.choices[0].message.content
            except (AttributeError, IndexError, TypeError):  # a server's malformed completion
                answer = None
            if not isinstance(answer, str):
                raise ValueError("the response holds no text answer")
            return answer
        except _RETRYABLE as err:
            if attempt == retries:
                raise
            delay = backoff * 2**attempt
            name = type(err).__name__
            logger.info("VLM request failed (%s); retry %d/%d in %.1f s", name, attempt + 1, retries, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _cached_or_asked(
    client: openai.OpenAI,
    content: Callable[[], list],
    cache_file: Path | None,
    record: dict,
    *,
    model: str,
    timeout: float,
    retries: int,
    backoff: float,
) -> tuple[str, bool]:
    """(answer, came from the cache). Builds the request content only when it is sent."""
    answer = _read_cache(cache_file) if cache_file is not None else None
    if answer is not None:
        return answer, True
    answer = _ask(client, model, content(), timeout, retries, backoff)
    if cache_file is not None:
        _write_cache(cache_file, {**record, "model": model, "answer": answer})
    return answer, False


def correct_video(
    frames_rgb: Sequence[np.ndarray] | np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    groups: Sequence[AmbiguityGroup],
    client: openai.OpenAI,
    *,
    model: str,
    video_name: str,
    cache_dir: str | os.PathLike | None = None,
    frames_per_query: int = 3,
    timeout: float = 60.0,
    retries: int = 2,
    backoff: float = 1.0,
    min_pixels: int = 100,
    max_image_side: int = 1024,
) -> tuple[np.ndarray, dict]:
    """Relabel each ambiguous-class region of one video to the class a multimodal LLM names.

    Args:
        frames_rgb: (T,H,W,3) uint8 RGB frames.
        labels: (T,H,W) integer class ids 0..K-1 (255 = ignore is left alone).
        class_names: the K class names (dataset spelling).
        groups: ambiguity groups (``load_groups``); members must be in ``class_names``.
        client: an ``openai.OpenAI`` client (``make_client``).
        model: chat model name, e.g. "gpt-4o" or the name a vLLM server gives a LLaVA model.
        video_name: video id, part of the cache key.
        cache_dir: folder of cached answers; None = no cache.
        frames_per_query: frames sent per request.
        timeout: seconds per request; retries: extra attempts after a retryable failure;
        backoff: first retry delay in seconds, doubled each retry.
        min_pixels: regions smaller than this over the whole video are left alone.
        max_image_side: frames are downscaled to at most this many pixels per side.

    Returns:
        (new labels (T,H,W), same dtype, a copy; report {group name: {"classes_present",
        "frames", "pixels", "answer", "choice", "cached", "status"}} for the groups present,
        status one of "relabelled", "unchanged" (the answer is the only class predicted),
        "unparsed", "failed", "too_small").
    """
    labels = np.asarray(labels)
    frame_hw = np.asarray(frames_rgb[0]).shape[:2] if len(frames_rgb) else None
    if labels.ndim != 3 or len(frames_rgb) != labels.shape[0] or frame_hw != labels.shape[1:]:
        raise ValueError(
            f"VLM ({video_name}): labels {labels.shape} must be (T,H,W) for {len(frames_rgb)} frames of {frame_hw}"
        )
    if frames_per_query < 1:
        raise ValueError(f"VLM: frames_per_query must be >= 1, got {frames_per_query}")
    class_index = {c: i for i, c in enumerate(class_names)}
    secret = getattr(client, "api_key", None)
    new = labels.copy()
    report = {}
    for group in groups:
        missing = [c for c in group.classes if c not in class_index]
        if missing:
            raise ValueError(f"VLM: classes {missing} of group {group.name!r} are not in the dataset")
        ids = [class_index[c] for c in group.classes]
        present = [c for c, i in zip(group.classes, ids) if (labels == i).any()]
        if not present:
            continue

        # 1. the region over the whole video and its largest frames
        region = np.isin(labels, ids)  # (T,H,W)
        counts = region.reshape(len(region), -1).sum(1)  # (T,)
        pixels = int(counts.sum())
        top = np.argsort(-counts, kind="stable")[:frames_per_query]
        chosen = sorted(int(t) for t in top if counts[t] > 0)
        entry = dict(
            classes_present=present,
            frames=chosen,
            pixels=pixels,
            answer=None,
            choice=None,
            cached=False,
            status="too_small",
        )
        report[group.name] = entry
        if pixels < min_pixels:
            continue

        # 2. the cached answer, else one request (with retries)
        record = dict(
            video=video_name,
            group=group.name,
            classes=list(group.classes),
            stuff=group.stuff,
            frames=chosen,
            pixels=pixels,
        )
        key = json.dumps([record, model])
        cache_file = None
        if cache_dir is not None:
            cache_file = Path(cache_dir) / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.json"

        content = functools.partial(
            _request_content, group, [frames_rgb[t] for t in chosen], region[chosen], max_image_side
        )
        try:
            answer, entry["cached"] = _cached_or_asked(
                client,
                content,
                cache_file,
                record,
                model=model,
                timeout=timeout,
                retries=retries,
                backoff=backoff,
            )
        except (openai.OpenAIError, ValueError) as err:
            entry["status"] = "failed"
            msg = _scrub(f"{type(err).__name__}: {err}", secret)
            warnings.warn(
                f"VLM ({video_name}, {group.name}): request failed, labels unchanged: {msg}",
                RuntimeWarning,
                stacklevel=2,
            )
            continue

        # 3. parse; relabel the whole region in every frame
        entry["answer"] = answer
        choice = parse_answer(answer, group.classes)
        if choice is None:
            entry["status"] = "unparsed"
            warnings.warn(
                f"VLM ({video_name}, {group.name}): no single class of {list(group.classes)} in "
                f"the answer {_scrub(answer[:200], secret)!r}; labels unchanged",
                RuntimeWarning,
                stacklevel=2,
            )
            continue
        entry["choice"] = choice
        entry["status"] = "unchanged" if present == [choice] else "relabelled"
        new[region] = class_index[choice]
        logger.info("VLM (%s, %s): %s -> %s (%d px)", video_name, group.name, present, choice, pixels)
    return new, report
