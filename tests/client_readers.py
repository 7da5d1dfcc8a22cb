"""The real reader code of A1111, ComfyUI and kohya (``../shared/clients``, verbatim), loaded for the conformance tests.

Each client is imported from its own files under its own package names (``modules.*``, ``comfy.*``, kohya's top-level
scripts). Stubbed, and only these: what the readers import but ../shared/clients does not carry, because it is UI,
device or process-wide state, or training machinery around the readers:

* A1111: ``modules.shared`` (command-line flags and settings, at A1111's defaults: the safe-unpickle check ON;
  ``sd_model`` is a small stand-in that tokenizes with the test model's tokenizer), ``modules.devices`` (CPU),
  ``modules.errors`` (records what A1111 would print, so tests can show it), ``modules.cache`` (the hash cache, in
  memory), ``modules.images`` (only its bundled font is asked for: PIL's default stands in), the model-hijack and UI
  modules ``sd_hijack`` imports (``sd_hijack_clip``, ``sd_models``, ``sd_samplers``, ...), the dataset / schedule /
  settings-file modules of the training tab, and the ``ldm`` / ``sgm`` model packages.
* ComfyUI: ``comfy.model_management``, ``comfy.ops``, ``comfy.clip_model``, ``folder_paths`` (device and global
  state). ComfyUI ships its CLIP tokenizer files next to ``comfy/sd1_clip.py``; the copy here does not carry them,
  so ``sd1_clip`` is pointed at the test model's CLIP tokenizer folder (the same BPE vocabulary).
* kohya: its ``library`` package (training utilities) and ``toml``; ``load_weights`` / ``save_weights`` and
  ``finetune/hypernetwork_nai.py`` use only torch and safetensors.

A client's modules live in ``sys.modules`` only while the client is :meth:`Client.active` (kohya's
``train_textual_inversion`` would otherwise shadow ours), and A1111's ``torch.load`` replacement (its safe-unpickle
check, installed by ``modules/safe.py`` on import) is in place only then.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import os
import sys
import types
from contextlib import contextmanager, nullcontext
from pathlib import Path
from types import SimpleNamespace

import torch
from PIL import ImageFont


class Anything:
    """Whatever a stubbed module is asked for: any attribute, call, item or assignment works and does nothing."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        value = Anything()
        object.__setattr__(self, name, value)
        return value

    def __call__(self, *args, **kwargs):
        return Anything()

    def __getitem__(self, key):
        return Anything()

    def __setitem__(self, key, value):
        pass

    def __iter__(self):
        return iter(())


class StubModule(types.ModuleType):
    """A stand-in module: set attributes explicitly where tests rely on them; anything else is an :class:`Anything`."""

    def __init__(self, name: str, **attrs):
        super().__init__(name)
        self.__path__ = []  # a package, so stubbed submodules can hang below it
        self.__dict__.update(attrs)

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        value = Anything()
        setattr(self, name, value)
        return value


class _StubLoader(importlib.abc.Loader):
    def create_module(self, spec):
        return StubModule(spec.name)

    def exec_module(self, module):
        pass


class _StubFinder(importlib.abc.MetaPathFinder):
    """Serves :class:`StubModule` for the listed module names and for everything below the listed packages."""

    def __init__(self, names: set[str], packages: set[str]):
        self.names = names
        self.packages = packages

    def find_spec(self, fullname, path=None, target=None):
        if fullname in self.names or fullname.split(".")[0] in self.packages:
            return importlib.machinery.ModuleSpec(fullname, _StubLoader(), is_package=True)
        return None


class Client:
    """One client's modules, imported in isolation from the test process's own modules of the same names."""

    def __init__(self, root: Path, roots: set[str]):
        self.root = root
        self.roots = roots  # top-level module names that belong to this client
        self.modules: dict[str, types.ModuleType] = {}

    def _owned(self, name: str) -> bool:
        return name.split(".")[0] in self.roots

    @contextmanager
    def active(self):
        """The client's modules in ``sys.modules`` and its folder on ``sys.path``; the previous ones put back after."""
        saved = {n: m for n, m in sys.modules.items() if self._owned(n)}
        for n in saved:
            del sys.modules[n]
        sys.modules.update(self.modules)
        sys.path.insert(0, str(self.root))
        try:
            yield self
        finally:
            sys.path.remove(str(self.root))
            for n in [n for n in sys.modules if self._owned(n)]:
                self.modules[n] = sys.modules.pop(n)
            sys.modules.update(saved)

    def load(self, names: list[str], stubs: dict[str, types.ModuleType] = (), stub_names: set[str] = frozenset(),
             stub_packages: set[str] = frozenset()) -> list[types.ModuleType]:
        """Import ``names`` from the client's folder; ``stubs`` are given module objects, ``stub_names`` /
        ``stub_packages`` are served as :class:`StubModule` on demand."""
        self.modules.update(dict(stubs))
        finder = _StubFinder(set(stub_names), set(stub_packages))
        sys.meta_path.insert(0, finder)
        try:
            with Client.active(self):
                return [importlib.import_module(n) for n in names]
        finally:
            sys.meta_path.remove(finder)

    def module(self, name: str) -> types.ModuleType:
        return self.modules[name]


# ---------------------------------------------------------------------------------------------------------------------
# A1111


class A1111Model:
    """What A1111's embedding database asks of ``shared.sd_model``: tokenize a name (ids without start/end tokens), and
    the width of the text encoder(s) (``encode_embedding_init_text``: SDXL concatenates both encoders)."""

    def __init__(self, tokenizer, token_embeddings: list[torch.nn.Embedding]):
        tables = token_embeddings

        class _Cond:
            def tokenize(self, texts):
                return [list(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]

            def encode_embedding_init_text(self, text, nvpt):
                ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"][:nvpt])
                return torch.cat([t.weight.detach()[ids] for t in tables], dim=1)

        self.cond_stage_model = _Cond()


class A1111(Client):
    """AUTOMATIC1111 web UI v1.10.1 with its default settings (safe-unpickle check on)."""

    def __init__(self, clients: Path, embeddings_dir: Path):
        a1111 = clients / "a1111"
        super().__init__(a1111, {"modules", "ldm", "sgm"})
        self.reports: list[str] = []
        self._hash_cache: dict[str, dict] = {}

        def report(message, exc_info=False):
            detail = f" ({sys.exc_info()[1]!r})" if exc_info and sys.exc_info()[1] is not None else ""
            self.reports.append(f"{message.strip()}{detail}")

        package = types.ModuleType("modules")
        package.__path__ = [str(a1111 / "modules")]
        self.shared = StubModule(
            "modules.shared",
            cmd_opts=SimpleNamespace(disable_safe_unpickle=False, no_hashing=False,
                                     embeddings_dir=str(embeddings_dir), hypernetwork_dir=str(embeddings_dir),
                                     textual_inversion_templates_dir=str(embeddings_dir)),
            # A1111's setting defaults; tests that resume from a sidecar switch save_optimizer_state on, as a user does.
            opts=SimpleNamespace(save_optimizer_state=False, print_hypernet_extra=False,
                                 textual_inversion_print_at_load=False),
            sd_model=None, loaded_hypernetworks=[], hypernetworks={}, ldm_print=print,
        )
        devices = StubModule("modules.devices", device=torch.device("cpu"), cpu=torch.device("cpu"),
                             torch_npu_set_device=lambda: None, cond_cast_unet=lambda t: t,
                             cond_cast_float=lambda t: t, autocast=lambda *a, **k: nullcontext())
        errors = StubModule("modules.errors", report=report, display=lambda e, task: report(f"{task}: {e!r}"))
        cache = StubModule("modules.cache", cache=lambda name: self._hash_cache.setdefault(name, {}),
                           dump_cache=lambda: None)
        # The PNG card caption asks images.get_font for A1111's bundled font; PIL's default font stands in.
        images = StubModule("modules.images", get_font=lambda size: ImageFont.load_default(size=size))
        stubs = {"modules": package, "modules.shared": self.shared, "modules.devices": devices,
                 "modules.errors": errors, "modules.cache": cache, "modules.images": images}
        for name, module in stubs.items():
            if name != "modules":
                setattr(package, name.split(".", 1)[1], module)
        ui_and_model_modules = {f"modules.{n}" for n in (
            "sd_models", "sd_samplers", "sd_hijack_checkpoint", "sd_hijack_optimizations",
            "script_callbacks", "sd_unet", "patches", "sd_hijack_clip", "sd_hijack_open_clip", "sd_hijack_unet",
            "sd_hijack_xlmr", "xlmr", "xlmr_m18", "processing", "textual_inversion.dataset",
            "textual_inversion.learn_schedule", "textual_inversion.saving_settings")}
        before = torch.load
        try:
            # sd_hijack first, as A1111 imports them: it pulls in the hypernetwork and embedding modules.
            self.safe, self.hashes, self.sd_hijack, self.textual_inversion, self.image_embedding, \
                self.hypernetwork = self.load(
                    ["modules.safe", "modules.hashes", "modules.sd_hijack",
                     "modules.textual_inversion.textual_inversion", "modules.textual_inversion.image_embedding",
                     "modules.hypernetworks.hypernetwork"],
                    stubs=stubs, stub_names=ui_and_model_modules, stub_packages={"ldm", "sgm"})
        finally:
            torch.load = before  # safe.py replaces torch.load on import; only active() puts its check in place

    @contextmanager
    def active(self):
        with super().active():
            before = torch.load
            torch.load = self.safe.load
            try:
                yield self
            finally:
                torch.load = before

    def use_model(self, tokenizer, token_embeddings: list[torch.nn.Embedding]) -> None:
        self.shared.sd_model = A1111Model(tokenizer, token_embeddings)

    def check_pt(self, path: Path) -> None:
        """A1111's safe-unpickle check on one file (raises what A1111 would report)."""
        with self.active():
            self.safe.check_pt(str(path), None)

    def load_embeddings(self, folder: Path):
        """A1111's embedding folder scan, as at start-up: returns the database (``word_embeddings``,
        ``skipped_embeddings``); anything A1111 would have reported is in ``self.reports``."""
        with self.active():
            db = self.textual_inversion.EmbeddingDatabase()
            db.add_embedding_dir(str(folder))
            db.load_textual_inversion_embeddings(force_reload=True)
        return db

    def load_hypernetwork(self, path: Path):
        with self.active():
            hn = self.hypernetwork.Hypernetwork()
            hn.load(str(path))
        return hn

    def torch_load(self, path: Path):
        """``torch.load`` as A1111 calls it (through the safe check); None when A1111 refuses the file."""
        with self.active():
            return torch.load(str(path), map_location="cpu")


# ---------------------------------------------------------------------------------------------------------------------
# ComfyUI


class ComfyUI(Client):
    def __init__(self, clients: Path, tokenizer_dir: Path, workdir: Path):
        super().__init__(clients / "comfyui", {"comfy", "comfy_extras", "folder_paths"})
        stubs = {"folder_paths": StubModule("folder_paths")}
        self.utils, self.sd1_clip, self.sdxl_clip, self.nodes_hypernetwork = self.load(
            ["comfy.utils", "comfy.sd1_clip", "comfy.sdxl_clip", "comfy_extras.nodes_hypernetwork"], stubs=stubs,
            stub_names={"comfy.model_management", "comfy.ops", "comfy.clip_model"})
        # sd1_clip finds its bundled tokenizer at <its folder>/sd1_tokenizer.
        home = workdir / "comfy"
        home.mkdir(parents=True, exist_ok=True)
        link = home / "sd1_tokenizer"
        if not link.exists():
            os.symlink(tokenizer_dir, link, target_is_directory=True)
        self.sd1_clip.__file__ = str(home / "sd1_clip.py")


# ---------------------------------------------------------------------------------------------------------------------
# kohya


class Kohya(Client):
    def __init__(self, clients: Path):
        super().__init__(clients / "kohya", {"train_textual_inversion", "sdxl_train_textual_inversion", "finetune",
                                             "library", "toml"})
        self.ti, self.sdxl_ti, self.hypernetwork_nai = self.load(
            ["train_textual_inversion", "sdxl_train_textual_inversion", "finetune.hypernetwork_nai"],
            stub_packages={"library", "toml"})

    def load_weights(self, path: Path, sdxl: bool = False):
        trainer = self.sdxl_ti.SdxlTextualInversionTrainer() if sdxl else self.ti.TextualInversionTrainer()
        with self.active():
            return trainer.load_weights(str(path))

    def save_weights(self, path: Path, embs: list[torch.Tensor], save_dtype=None, metadata=None, sdxl=False):
        trainer = self.sdxl_ti.SdxlTextualInversionTrainer() if sdxl else self.ti.TextualInversionTrainer()
        with self.active():
            trainer.save_weights(str(path), embs, save_dtype, metadata)
