"""Prompt embeddings: SD3's three text encoders run once per prompt, results cached on disk.

A run needs at most 2^K + 1 prompts (docs/METHOD.md §1). They are encoded with diffusers' own SD3 prompt encoding
(CLIP-L and CLIP-G penultimate hidden states + pooled outputs, T5 up to 256 tokens), saved one safetensors
file per prompt under `<cache>/<base fingerprint>/`, and the encoders are freed. The sampler reads only
cached embeddings, so array jobs that find the cache filled never load T5.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

from mdsd3_cli.util.atomic import atomic_write

T5_MAX_TOKENS = 256
CACHE_ENCODING = "one-prompt-per-forward"
"""Cache entries written otherwise (batched, by older versions) depend on their batch mates: re-encoded."""
PROMPT_CACHE_ENV = "MDSD3_PROMPT_CACHE"
_TEXT_FOLDERS = {
    "text_encoder": ("tokenizer", "CLIPTextModelWithProjection"),
    "text_encoder_2": ("tokenizer_2", "CLIPTextModelWithProjection"),
    "text_encoder_3": ("tokenizer_3", "T5EncoderModel"),
}
TINY_CLIP = dict(
    hidden_size=16,
    intermediate_size=37,
    num_hidden_layers=2,
    num_attention_heads=2,
    projection_dim=16,
    max_position_embeddings=77,
)
TINY_T5 = dict(d_model=32, d_ff=37, d_kv=8, num_layers=2, num_heads=4, relative_attention_num_buckets=8)


@dataclass(frozen=True)
class PromptEmbedding:
    """One prompt's embeddings: `embeds` [S, D] (CLIP-L|CLIP-G padded to T5 width, then T5) and `pooled` [P]."""

    embeds: torch.Tensor
    pooled: torch.Tensor


class TextEncoder:
    """SD3's text encoders wrapped in a text-only diffusers pipeline, so encoding follows SD3's conventions."""

    def __init__(self, pipeline, device: torch.device | str):
        self.pipeline = pipeline
        self.device = torch.device(device)

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> list[PromptEmbedding]:
        """One prompt per forward: an embedding must not depend on which prompts were encoded with it (a
        batch of several takes other CPU matrix kernels than a batch of one, changing the last bits)."""
        return [self._encode_one(prompt) for prompt in prompts]

    def _encode_one(self, prompt: str) -> PromptEmbedding:
        embeds, _, pooled, _ = self.pipeline.encode_prompt(
            prompt=[prompt],
            prompt_2=None,
            prompt_3=None,
            device=self.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=False,
            max_sequence_length=T5_MAX_TOKENS,
        )
        return PromptEmbedding(embeds[0].float().cpu().contiguous(), pooled[0].float().cpu().contiguous())


def _char_tokenizer(max_length: int, bos: bool):
    """An offline character-level tokenizer (tiny preset only)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
    vocab = {token: index for index, token in enumerate(specials + [chr(i) for i in range(33, 127)])}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Split("", "isolated")]
    )
    template = "<bos> $A <eos>" if bos else "$A <eos>"
    tokenizer.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[("<bos>", 1), ("<eos>", 2)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=max_length,
    )


def tiny_text_encoder(seed: int, device: torch.device | str = "cpu") -> TextEncoder:
    """Seeded random CLIP-L / CLIP-G / T5 stand-ins with offline tokenizers for the `tiny` preset."""
    from diffusers import StableDiffusion3Pipeline
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    vocab = 4 + 94
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        clip_config = CLIPTextConfig(vocab_size=vocab, pad_token_id=0, bos_token_id=1, eos_token_id=2, **TINY_CLIP)
        clip_l, clip_g = CLIPTextModelWithProjection(clip_config), CLIPTextModelWithProjection(clip_config)
        t5 = T5EncoderModel(T5Config(vocab_size=vocab, pad_token_id=0, eos_token_id=2, **TINY_T5))
    pipeline = StableDiffusion3Pipeline(
        transformer=None,
        scheduler=None,
        vae=None,
        text_encoder=clip_l.to(device).eval(),
        tokenizer=_char_tokenizer(77, bos=True),
        text_encoder_2=clip_g.to(device).eval(),
        tokenizer_2=_char_tokenizer(77, bos=True),
        text_encoder_3=t5.to(device).eval(),
        tokenizer_3=_char_tokenizer(512, bos=False),
    )
    return TextEncoder(pipeline, device)


class WordTextEncoder:
    """A bag-of-words text encoder (the `mini` preset's): each class word has a fixed vector, shipped as data.

    `embeds` [max_words, D] holds the prompt's word vectors in order, zero rows after them (SD3 context tokens
    carry no position, so "rain haze" is the set {rain, haze}). `pooled` is one shared vector for every
    non-empty prompt and zeros for the unconditional "": it tells conditional from unconditional samples (with
    an all-zero head mask, "clean" and "" would otherwise look the same), while the classes reach the model only
    through the context tokens, where the head mask acts, so a combination of classes never meets an unseen
    pooled vector. Folder: `text_encoder/config.json` (`"_class_name": "WordTextEncoder"`, `words`,
    `max_words`) + `text_encoder/model.safetensors` (`vectors` [len(words), D], `pooled` [D]).
    """

    CLASS_NAME = "WordTextEncoder"
    WEIGHTS = "model.safetensors"

    def __init__(self, words: list[str], vectors: torch.Tensor, pooled: torch.Tensor, max_words: int):
        if vectors.shape[0] != len(words) or pooled.shape != vectors.shape[1:]:
            raise ValueError(
                f"{len(words)} words need vectors [{len(words)}, D] and pooled [D]; got "
                f"{list(vectors.shape)} and {list(pooled.shape)}"
            )
        self.words, self.vectors, self.pooled, self.max_words = list(words), vectors.float(), pooled.float(), max_words

    def encode(self, prompts: list[str]) -> list[PromptEmbedding]:
        rows = []
        for prompt in prompts:
            tokens = prompt.split()
            unknown = [token for token in tokens if token not in self.words]
            if unknown or len(tokens) > self.max_words:
                raise ValueError(
                    f"prompt {prompt!r}: this text encoder knows at most {self.max_words} of the words {self.words}"
                )
            embeds = torch.zeros(self.max_words, self.vectors.shape[1])
            for index, token in enumerate(tokens):
                embeds[index] = self.vectors[self.words.index(token)]
            rows.append(PromptEmbedding(embeds, self.pooled.clone() if tokens else torch.zeros_like(self.pooled)))
        return rows

    def save(self, folder: str | os.PathLike) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(
            folder / self.WEIGHTS, save({"vectors": self.vectors.contiguous(), "pooled": self.pooled.contiguous()})
        )
        config = {"_class_name": self.CLASS_NAME, "words": self.words, "max_words": self.max_words}
        atomic_write(folder / "config.json", (json.dumps(config, indent=2) + "\n").encode())

    @classmethod
    def load(cls, folder: str | os.PathLike) -> WordTextEncoder:
        folder = Path(folder)
        config = json.loads((folder / "config.json").read_text())
        with safe_open(str(folder / cls.WEIGHTS), framework="pt") as handle:
            vectors, pooled = handle.get_tensor("vectors"), handle.get_tensor("pooled")
        return cls(list(config["words"]), vectors, pooled, int(config["max_words"]))

    @classmethod
    def is_folder(cls, folder: str | os.PathLike) -> bool:
        try:
            return json.loads((Path(folder) / "config.json").read_text()).get("_class_name") == cls.CLASS_NAME
        except (OSError, json.JSONDecodeError):
            return False


def folder_text_encoder(
    root: str | os.PathLike, device: torch.device | str, dtype: torch.dtype
) -> TextEncoder | WordTextEncoder:
    """SD3's text encoders from a local diffusers folder; T5 is optional (SD3 then uses zeros for it). A folder
    whose text_encoder/ is a `WordTextEncoder` (the mini preset) gets that instead."""
    import transformers
    from diffusers import StableDiffusion3Pipeline

    root = Path(root)
    if WordTextEncoder.is_folder(root / "text_encoder"):
        return WordTextEncoder.load(root / "text_encoder")
    parts = {}
    for encoder_name, (tokenizer_name, class_name) in _TEXT_FOLDERS.items():
        if not (root / encoder_name).is_dir():
            if encoder_name != "text_encoder_3":
                raise FileNotFoundError(f"base model folder {root} has no {encoder_name}/ (needed to encode prompts)")
            parts[encoder_name] = parts[tokenizer_name] = None
            continue
        model_class = getattr(transformers, class_name)
        parts[encoder_name] = (
            model_class.from_pretrained(root / encoder_name, torch_dtype=dtype, local_files_only=True).to(device).eval()
        )
        parts[tokenizer_name] = transformers.AutoTokenizer.from_pretrained(root / tokenizer_name, local_files_only=True)
    pipeline = StableDiffusion3Pipeline(transformer=None, scheduler=None, vae=None, **parts)
    return TextEncoder(pipeline, device)


def default_cache_dir(environ: Mapping[str, str] = os.environ) -> Path:
    """$MDSD3_PROMPT_CACHE, else $XDG_CACHE_HOME/mdsd3/prompts, else ~/.cache/mdsd3/prompts."""
    if environ.get(PROMPT_CACHE_ENV):
        return Path(environ[PROMPT_CACHE_ENV]).expanduser()
    return Path(environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "mdsd3" / "prompts"


class PromptCache:
    """Prompt embeddings on disk, keyed by base fingerprint and prompt text; one file per prompt."""

    def __init__(self, cache_dir: str | os.PathLike, fingerprint: str):
        self.folder = Path(cache_dir).expanduser() / fingerprint
        self.fingerprint = fingerprint

    def path_for(self, prompt: str) -> Path:
        return self.folder / (hashlib.sha256(prompt.encode()).hexdigest()[:32] + ".safetensors")

    def _read(self, prompt: str) -> PromptEmbedding | None:
        path = self.path_for(prompt)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata()
                if metadata.get("prompt") != prompt or metadata.get("encoding") != CACHE_ENCODING:
                    return None
                return PromptEmbedding(handle.get_tensor("embeds"), handle.get_tensor("pooled"))
        except Exception:  # a damaged cache entry is re-encoded, never trusted
            return None

    def _write(self, prompt: str, embedding: PromptEmbedding) -> None:
        tensors = {"embeds": embedding.embeds, "pooled": embedding.pooled}
        metadata = {"prompt": prompt, "fingerprint": self.fingerprint, "encoding": CACHE_ENCODING}
        atomic_write(self.path_for(prompt), save(tensors, metadata=metadata), shared=True)  # several processes

    def missing(self, prompts: Iterable[str]) -> list[str]:
        """Prompts that have no valid cache entry."""
        return [prompt for prompt in dict.fromkeys(prompts) if self._read(prompt) is None]

    def get(
        self, prompts: Iterable[str], make_encoder: Callable[[], TextEncoder | WordTextEncoder]
    ) -> dict[str, PromptEmbedding]:
        """Embeddings for `prompts`; only on a miss is `make_encoder` called (once), then the encoders are freed."""
        prompts = list(dict.fromkeys(prompts))
        found = {prompt: self._read(prompt) for prompt in prompts}
        todo = [prompt for prompt, embedding in found.items() if embedding is None]
        if todo:
            encoder = make_encoder()
            for prompt, embedding in zip(todo, encoder.encode(todo)):
                self._write(prompt, embedding)
                found[prompt] = embedding
            del encoder
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        return found


def text_encoder_for(
    source: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> TextEncoder | WordTextEncoder:
    """The text encoders of a base: the tiny preset's stand-ins, or those in a local SD3 folder."""
    from mdsd3_cli.model.presets import resolve_base_source
    from mdsd3_cli.model.weights import TINY, TINY_SEED

    if source == TINY:
        return tiny_text_encoder(TINY_SEED, device)
    return folder_text_encoder(resolve_base_source(source), device, dtype)


def load_prompt_embeddings(
    source: str,
    fingerprint: str,
    prompts: Iterable[str],
    cache_dir: str | os.PathLike | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> dict[str, PromptEmbedding]:
    """Embeddings for `prompts` from the cache, encoding (and caching) only those missing."""
    cache = PromptCache(cache_dir or default_cache_dir(), fingerprint)
    return cache.get(prompts, lambda: text_encoder_for(source, device, dtype))
