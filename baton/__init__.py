"""Baton: disaggregated prefill/decode LLM serving."""
