"""acornlm.tokenizer"""
