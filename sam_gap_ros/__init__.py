"""sam_gap_ros: SAM2 tracking and SAM3 concept segmentation for orchard robots.

The package is split into a ROS-free core (``engines``, ``mask_ops``, ``image_conversion``,
``synthetic``, ``tensorrt``) and thin rclpy adapters in ``nodes``.
"""

__version__ = '0.1.0'
