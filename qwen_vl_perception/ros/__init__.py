"""Thin rclpy shell over the ROS-free core."""
