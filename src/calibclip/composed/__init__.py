"""calibclip.composed"""
