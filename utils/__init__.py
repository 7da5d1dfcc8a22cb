"""Embedforge library: the pieces shared by the four command-line scripts."""

import logging as _logging


class _NoTorchvisionFallbackNotice(_logging.Filter):
    """Drops transformers' notice that an image processor "requires torchvision (not installed)" and falls back to
    its PIL twin. diffusers' pipeline modules name CLIPImageProcessor and SiglipImageProcessor when they are
    imported, so without torchvision (which nothing here needs, README "Install") every start printed two such
    lines. The PIL processors are what is used; every other message of that logger still gets through."""

    def filter(self, record: _logging.LogRecord) -> bool:
        return "requires torchvision (not installed); falling back to" not in record.getMessage()


# transformers logs it through the stdlib logger of this name (transformers.utils.logging.get_logger(__name__)).
_logging.getLogger("transformers.utils.import_utils").addFilter(_NoTorchvisionFallbackNotice())
