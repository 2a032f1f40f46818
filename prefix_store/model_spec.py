"""Moved to `modeling.model_spec` (issue 14: the spec describes the model, the bottom layer); this alias
keeps imports of branches written before the move working. New code imports `modeling.model_spec`."""

from modeling.model_spec import ModelSpec

__all__ = ["ModelSpec"]
