"""calibclip.web"""
