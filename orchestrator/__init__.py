"""fsearch: orchestrator."""
