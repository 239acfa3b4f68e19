"""Organizations, projects, who sees what, the audit log, and deleting what a tenant owns.

The isolation boundary is the organization: another organization's objects are answered with
404 and never listed. Inside an organization a project key sees only its project's objects
(OpenAI's behaviour); an organization admin key sees them all.
"""
