"""A seeded generator of MERIT-like products: silhouettes, rendered visual attributes, multilingual titles."""
