"""calibclip.evaluation"""
