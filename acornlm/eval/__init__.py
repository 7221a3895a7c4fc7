"""acornlm.eval"""
