"""acornlm.serve"""
