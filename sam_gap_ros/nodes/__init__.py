"""rclpy adapters: the only place in sam_gap_ros that imports ROS."""
