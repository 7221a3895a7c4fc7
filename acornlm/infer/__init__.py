"""acornlm.infer"""
