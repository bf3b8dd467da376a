//! switchyard transport (lapin): under construction.
