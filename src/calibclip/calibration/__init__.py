"""calibclip.calibration"""
