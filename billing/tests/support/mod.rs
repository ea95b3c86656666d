//! Test support shared by the billing crate's integration tests; each test
//! binary uses part of it.

#![allow(dead_code)]

pub mod db;
