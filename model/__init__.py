"""fsearch: model."""
