"""Model loading (hub id or local dir) and tiny offline model builders."""
