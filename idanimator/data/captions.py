"""Decoupled captions: one of the person (attributes), one of the clip (action), merged by a rewriter.

The paper captions the person's look from a frame with an image captioner, the action from the video, and
has a language model merge the two into one prompt-like caption. Back ends, chosen by name:

* ``template`` (the default; needs no model): both captions and the merge come from the video's labels
  (appearance, action, emotion; see :mod:`.labels`); a video without labels gets a neutral generic caption.
* a ``transformers`` image-text-to-text model (a Hub id or a local folder), e.g. a captioner such as
  ``Salesforce/blip-image-captioning-large`` or a chat VLM such as ``llava-hf/llava-1.5-7b-hf``; it looks at
  the frame with the clip's largest face (see :class:`LocalCaptioner` for the action).
* an OpenAI-compatible endpoint, by URL (:mod:`.remote`): a vision-language model is asked for the person's
  look from that frame and for the action from four frames spread over the clip; as the rewriter, a language
  model merges the two captions.

The rewriter is ``template`` (the action's generic subject is replaced by the person's description) or a URL.
"""

from __future__ import annotations

import threading
from typing import Protocol

import numpy as np

from ..errors import IDAnimatorError
from .labels import VideoLabels
from .remote import ChatEndpoint, is_url

TEMPLATE = "template"
GENERIC_PERSON = "a person"
GENERIC_ACTION = "a person in a video"
ACTION_FRAMES = 4  # frames a vision-language model sees to describe the action
CAPTION_PREFIX = "a photo of"  # what a plain image captioner (BLIP, GIT) is asked to continue
MAX_NEW_TOKENS = 60

ATTRIBUTE_PROMPT = (
    "Describe the main person's appearance in one short phrase (gender, age, hair, facial hair, glasses, "
    "make-up, clothing). Do not describe the background or what they are doing."
)
ACTION_PROMPT = (
    "These frames come from one video clip, in order. In one short phrase starting with 'a person', say what "
    "the main person is doing and their expression. Do not describe their appearance."
)
REWRITE_PROMPT = (
    "Merge these two descriptions of one video into a single fluent caption of at most 40 words, keeping "
    "every detail and adding none. Answer with the caption only.\nThe person: {attribute}\nThe action: {action}"
)

_EMOTION_WORDS = {
    "anger": "angry",
    "contempt": "contemptuous",
    "disgust": "disgusted",
    "fear": "fearful",
    "happiness": "happy",
    "sadness": "sad",
    "surprise": "surprised",
}
_GENDER_NOUNS = {"male": "man", "man": "man", "female": "woman", "woman": "woman"}
_LEADING = {"young", "old", "chubby", "attractive", "bald"}  # words that read best before the noun
_ING_VERBS = {"sing", "bring", "ring", "sting", "swing", "cling", "fling", "spring", "string", "wring"}
_SKIP = {"blurry", "no beard"}  # a property of the footage, and an absence (CelebA's names, as CelebV-HQ's)
_RENAMED = {"5 o clock shadow": "stubble"}
_ARTICLE = {"hat", "necklace", "necktie", "mask", "tie", "scarf", "cap"}  # 'wearing a hat', 'wearing earrings'
_HAIR_ORDER = ("long", "short", "straight", "wavy", "curly")  # then the colour: 'long wavy brown hair'


class Captioner(Protocol):
    name: str
    needs_frames: bool  # False: captions come from labels only, so no full frame needs keeping

    def describe(
        self, subject: np.ndarray | None, action_frames: list[np.ndarray], labels: VideoLabels | None
    ) -> tuple[str, str]:
        """(attribute caption, action caption) for one clip."""


class Rewriter(Protocol):
    name: str

    def merge(self, attribute: str, action: str) -> str: ...


# -- templates --------------------------------------------------------------------------------------


def _join(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def attribute_caption(labels: VideoLabels | None) -> str:
    """'a young man with black hair and eyeglasses' from appearance labels; 'a person' without any.

    CelebA's attribute names (CelebV-HQ's) read as a phrase: the hair words join ('long wavy brown hair'),
    'wearing_x' comes last ('..., wearing a hat'), 'no beard' is left out."""
    words = [_RENAMED.get(w, w) for w in (labels.appearance if labels else ()) if w not in _SKIP]
    noun = next((_GENDER_NOUNS[w] for w in words if w in _GENDER_NOUNS), "person")
    leading = [w for w in words if w in _LEADING]
    rest = [w for w in words if w not in _GENDER_NOUNS and w not in _LEADING]
    worn = [w.removeprefix("wearing ") for w in rest if w.startswith("wearing ")]
    worn = [f"a {w}" if w in _ARTICLE else w for w in worn]
    hair_words = [w for w in rest if w.endswith(" hair") and " " not in w.removesuffix(" hair")]
    hair = [w.removesuffix(" hair") for w in hair_words]
    features = [w for w in rest if not w.startswith("wearing ") and w not in hair_words]
    if hair:
        hair.sort(key=lambda w: _HAIR_ORDER.index(w) if w in _HAIR_ORDER else len(_HAIR_ORDER))
        features.insert(0, " ".join(hair) + " hair")
    phrase = " ".join([*leading, noun])
    phrase = ("an " if phrase[0] in "aeiou" else "a ") + phrase
    phrase = f"{phrase} with {_join(features)}" if features else phrase
    return f"{phrase}, wearing {_join(worn)}" if worn else phrase


def gerund(action: str) -> str:
    """'talk' -> 'talking', 'smile' -> 'smiling', 'nod' -> 'nodding', 'shake head' -> 'shaking head'."""
    verb, _, rest = action.partition(" ")
    if not verb or any(w.endswith("ing") and w not in _ING_VERBS for w in action.split()):  # 'head wagging'
        return action
    short_cvc = 3 <= len(verb) <= 4 and verb[-1] not in "aeiouwxy" and verb[-2] in "aeiou" and verb[-3] not in "aeiou"
    if verb.endswith("e") and not verb.endswith(("ee", "ye", "oe")):
        verb = verb[:-1] + "ing"
    elif short_cvc and verb[0] not in "aeiou":  # nod -> nodding, stop -> stopping; open -> opening
        verb = verb + verb[-1] + "ing"
    else:
        verb += "ing"
    return f"{verb} {rest}".strip()


def action_caption(labels: VideoLabels | None) -> str:
    """'a person talking and smiling, looking happy' from action and emotion labels."""
    actions = [gerund(a) for a in (labels.action if labels else ())]
    emotions = [_EMOTION_WORDS.get(e, e) for e in (labels.emotion if labels else ()) if e != "neutral"]
    if not actions and not emotions:
        return GENERIC_ACTION
    parts = [f"{GENERIC_PERSON} {_join(actions)}" if actions else GENERIC_PERSON]
    if emotions:
        parts.append(f"looking {_join(emotions)}")
    return ", ".join(parts)


def template_merge(attribute: str, action: str) -> str:
    """The action with its generic subject replaced by the person: 'a young man ... talking and smiling'."""
    attribute, action = attribute.strip().rstrip("."), action.strip().rstrip(".")
    for subject in (GENERIC_PERSON, "the person", "someone"):
        if action.lower().startswith(subject + " ") or action.lower().startswith(subject + ","):
            return attribute + action[len(subject) :]
        if action.lower() == subject:
            return attribute
    return f"{attribute}. {action[:1].upper()}{action[1:]}" if action else attribute


class TemplateCaptioner:
    name = TEMPLATE
    needs_frames = False

    def describe(self, subject, action_frames, labels):
        return attribute_caption(labels), action_caption(labels)


class TemplateRewriter:
    name = TEMPLATE

    def merge(self, attribute: str, action: str) -> str:
        return template_merge(attribute, action)


# -- models -----------------------------------------------------------------------------------------


class LocalCaptioner:
    """A transformers ``image-text-to-text`` model (transformers 5's pipeline for captioners and VLMs), loaded
    once and shared by all workers, one call at a time.

    A chat model (its processor has a chat template: LLaVA, Qwen2-VL, ...) is asked the same questions as a
    remote one, the action from several frames. A plain captioner (BLIP, GIT) continues ``CAPTION_PREFIX`` on
    one frame: the person's frame for the look; for the action the labels are used when they name one, else
    the clip's middle frame is captioned (an image captioner cannot see motion).
    """

    needs_frames = True

    def __init__(self, name: str):
        from ..weights import hub_reachable, is_cached, parse_source, resolve

        self.name = name
        try:
            source = parse_source(name)
        except IDAnimatorError as exc:
            raise unknown_backend("captioner", name) from exc
        if not is_cached(source) and not hub_reachable():
            raise IDAnimatorError(
                f"The captioner model {name} is not in the Hugging Face cache and the Hub cannot be reached; "
                "download it first or give a local folder."
            )
        folder = resolve(source, what="captioner")
        try:
            from transformers import pipeline

            self._pipe = pipeline("image-text-to-text", model=str(folder))
        except Exception as exc:  # transformers raises many kinds for a folder that is not such a model
            first_line = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
            raise IDAnimatorError(
                f"The captioner {name} could not be loaded as a transformers image-text-to-text model ({first_line})."
            ) from exc
        self.chat = getattr(self._pipe.processor, "chat_template", None) is not None
        self._lock = threading.Lock()

    def ask(self, prompt: str, frames: list[np.ndarray]) -> str:
        from PIL import Image

        images = [Image.fromarray(frame) for frame in frames]
        with self._lock:
            if self.chat:
                content = [{"type": "image", "image": image} for image in images] + [{"type": "text", "text": prompt}]
                messages = [{"role": "user", "content": content}]
                result = self._pipe(text=messages, max_new_tokens=MAX_NEW_TOKENS, return_full_text=False)
            else:
                result = self._pipe(
                    images=images[0], text=CAPTION_PREFIX, max_new_tokens=MAX_NEW_TOKENS, return_full_text=False
                )
        first = result[0] if result else {}
        first = first[0] if isinstance(first, list) and first else first
        return " ".join(str(first.get("generated_text", "") if isinstance(first, dict) else "").split())

    def describe(self, subject, action_frames, labels):
        attribute = (self.ask(ATTRIBUTE_PROMPT, [subject]) if subject is not None else "") or attribute_caption(labels)
        if self.chat and action_frames:
            action = self.ask(ACTION_PROMPT, action_frames)
        elif labels and (labels.action or labels.emotion):
            action = action_caption(labels)
        else:
            middle = action_frames[len(action_frames) // 2] if action_frames else subject
            action = self.ask(ACTION_PROMPT, [middle]) if middle is not None else ""
        return attribute, action or GENERIC_ACTION


class RemoteCaptioner:
    needs_frames = True

    def __init__(self, url: str):
        self.name = url
        self.endpoint = ChatEndpoint(url, "captioner").check()

    def describe(self, subject, action_frames, labels):
        attribute = self.endpoint.chat(ATTRIBUTE_PROMPT, [subject]) if subject is not None else GENERIC_PERSON
        action = self.endpoint.chat(ACTION_PROMPT, action_frames) if action_frames else action_caption(labels)
        return attribute, action


class RemoteRewriter:
    def __init__(self, url: str):
        self.name = url
        self.endpoint = ChatEndpoint(url, "rewriter").check()

    def merge(self, attribute: str, action: str) -> str:
        return self.endpoint.chat(REWRITE_PROMPT.format(attribute=attribute, action=action))


# -- choosing ---------------------------------------------------------------------------------------


def unknown_backend(what: str, name: str) -> IDAnimatorError:
    models = " a transformers image-text-to-text model (Hub id or local folder)," if what == "captioner" else ""
    return IDAnimatorError(
        f"The {what} {name!r} is not '{TEMPLATE}',{models} or an http(s) URL of an OpenAI-compatible endpoint."
    )


def get_captioner(name: str | None) -> Captioner:
    """The captioner called ``name``: 'template', a URL or a transformers model; problems are one sentence."""
    name = (name or TEMPLATE).strip()
    if name.lower() == TEMPLATE:
        return TemplateCaptioner()
    if is_url(name):
        return RemoteCaptioner(name)
    return LocalCaptioner(name)


def get_rewriter(name: str | None) -> Rewriter:
    name = (name or TEMPLATE).strip()
    if name.lower() == TEMPLATE:
        return TemplateRewriter()
    if is_url(name):
        return RemoteRewriter(name)
    raise unknown_backend("rewriter", name)
