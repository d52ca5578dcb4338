package main

// `ifw-test-apiserver covers`: Kubernetes' own rule comparison for tests.
// Reads {"owner": [PolicyRule...], "servant": [PolicyRule...]} as JSON on
// stdin and prints {"covers": bool, "uncovered": [PolicyRule...]}: whether
// the owner's rules allow everything the servant's allow, by
// validation.Covers (what the RBAC API checks against privilege escalation,
// and what this server's authorizer decides requests with). Unknown fields
// are an error, so a misspelt key cannot make a rule vanish.

import (
	"encoding/json"
	"fmt"

	"github.com/spf13/cobra"

	rbacv1 "k8s.io/api/rbac/v1"
	"k8s.io/component-helpers/auth/rbac/validation"
)

func coversCommand() *cobra.Command {
	return &cobra.Command{
		Use:   "covers",
		Short: `read {"owner": [rules], "servant": [rules]} on stdin; print {"covers", "uncovered"}`,
		Args:  cobra.NoArgs,
		// not the server's: no component registry to set up
		PersistentPreRunE: func(*cobra.Command, []string) error { return nil },
		RunE: func(c *cobra.Command, _ []string) error {
			var in struct {
				Owner   []rbacv1.PolicyRule `json:"owner"`
				Servant []rbacv1.PolicyRule `json:"servant"`
			}
			dec := json.NewDecoder(c.InOrStdin())
			dec.DisallowUnknownFields()
			if err := dec.Decode(&in); err != nil {
				return fmt.Errorf("reading the rules from stdin: %w", err)
			}
			ok, uncovered := validation.Covers(in.Owner, in.Servant)
			if uncovered == nil {
				uncovered = []rbacv1.PolicyRule{}
			}
			return json.NewEncoder(c.OutOrStdout()).Encode(map[string]any{"covers": ok, "uncovered": uncovered})
		},
	}
}
