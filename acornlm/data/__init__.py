"""acornlm.data"""
