"""calibclip.index"""
