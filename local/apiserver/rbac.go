package main

// RBAC enforcement for every identity but system:masters.
//
// kube-apiserver's RBAC authorizer lives in k8s.io/kubernetes, which Debian
// does not package. This one decides the same way from the same objects:
// it finds the RoleBindings (in the request's namespace) and
// ClusterRoleBindings whose subjects name the user, one of its groups or its
// service account, and allows the request when the rules of a bound Role or
// ClusterRole cover it, by k8s.io/component-helpers' validation.Covers (the
// comparison Kubernetes uses against privilege escalation). A request is the
// rule {verb, group, resource[/subresource], name if any}, or {verb,
// nonResourceURL}. Not modelled: aggregated ClusterRoles (there is no
// controller to aggregate them) and the bootstrap policy objects; every
// authenticated user gets what the bootstrap system:discovery and
// system:public-info-viewer ClusterRoles grant.

import (
	"context"
	"fmt"
	"slices"
	"strings"
	"sync"
	"time"

	rbacv1 "k8s.io/api/rbac/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apiserver/pkg/authentication/serviceaccount"
	"k8s.io/apiserver/pkg/authentication/user"
	"k8s.io/apiserver/pkg/authorization/authorizer"
	rbacinformers "k8s.io/client-go/informers/rbac/v1"
	"k8s.io/client-go/kubernetes"
	rbaclisters "k8s.io/client-go/listers/rbac/v1"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"
	"k8s.io/component-helpers/auth/rbac/validation"
)

// discoveryRules: what kube-apiserver's bootstrap policy grants every
// authenticated user (system:discovery, system:public-info-viewer).
var discoveryRules = []rbacv1.PolicyRule{{
	Verbs: []string{"get"},
	NonResourceURLs: []string{"/api", "/api/*", "/apis", "/apis/*", "/healthz", "/livez", "/readyz",
		"/openapi", "/openapi/*", "/version", "/version/"},
}}

type rbacAuthorizer struct {
	mu              sync.RWMutex
	ready           bool
	roles           rbaclisters.RoleLister
	roleBindings    rbaclisters.RoleBindingLister
	clusterRoles    rbaclisters.ClusterRoleLister
	clusterBindings rbaclisters.ClusterRoleBindingLister
}

// start fills the caches from this server's own RBAC objects (a post-start
// hook: the server must serve before it can list itself) and blocks until
// they are synced, so /readyz is only ok once decisions are right.
func (a *rbacAuthorizer) start(ctx context.Context, loopback *rest.Config) error {
	client, err := kubernetes.NewForConfig(loopback)
	if err != nil {
		return err
	}
	const resync = 10 * time.Minute
	informers := []cache.SharedIndexInformer{
		rbacinformers.NewRoleInformer(client, "", resync, cache.Indexers{cache.NamespaceIndex: cache.MetaNamespaceIndexFunc}),
		rbacinformers.NewRoleBindingInformer(client, "", resync, cache.Indexers{cache.NamespaceIndex: cache.MetaNamespaceIndexFunc}),
		rbacinformers.NewClusterRoleInformer(client, resync, cache.Indexers{}),
		rbacinformers.NewClusterRoleBindingInformer(client, resync, cache.Indexers{}),
	}
	synced := make([]cache.InformerSynced, len(informers))
	for i, inf := range informers {
		go inf.Run(ctx.Done())
		synced[i] = inf.HasSynced
	}
	if !cache.WaitForCacheSync(ctx.Done(), synced...) {
		return fmt.Errorf("RBAC caches did not sync")
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	a.roles = rbaclisters.NewRoleLister(informers[0].GetIndexer())
	a.roleBindings = rbaclisters.NewRoleBindingLister(informers[1].GetIndexer())
	a.clusterRoles = rbaclisters.NewClusterRoleLister(informers[2].GetIndexer())
	a.clusterBindings = rbaclisters.NewClusterRoleBindingLister(informers[3].GetIndexer())
	a.ready = true
	return nil
}

// requestRule is the request as one PolicyRule: what a rule must cover to allow it.
func requestRule(attrs authorizer.Attributes) rbacv1.PolicyRule {
	if !attrs.IsResourceRequest() {
		return rbacv1.PolicyRule{Verbs: []string{attrs.GetVerb()}, NonResourceURLs: []string{attrs.GetPath()}}
	}
	resource := attrs.GetResource()
	if sub := attrs.GetSubresource(); sub != "" {
		resource += "/" + sub
	}
	rule := rbacv1.PolicyRule{Verbs: []string{attrs.GetVerb()}, APIGroups: []string{attrs.GetAPIGroup()},
		Resources: []string{resource}}
	if name := attrs.GetName(); name != "" {
		rule.ResourceNames = []string{name}
	}
	return rule
}

func describeRule(r rbacv1.PolicyRule) string {
	if len(r.NonResourceURLs) > 0 {
		return fmt.Sprintf("%s %s", r.Verbs[0], r.NonResourceURLs[0])
	}
	s := fmt.Sprintf("%s %s", r.Verbs[0], r.Resources[0])
	if g := r.APIGroups[0]; g != "" {
		s = fmt.Sprintf("%s %s.%s", r.Verbs[0], r.Resources[0], g)
	}
	if len(r.ResourceNames) > 0 {
		s += " " + r.ResourceNames[0]
	}
	return s
}

func (a *rbacAuthorizer) Authorize(ctx context.Context, attrs authorizer.Attributes) (authorizer.Decision, string, error) {
	u := attrs.GetUser()
	if u == nil {
		return authorizer.DecisionNoOpinion, "no user", nil
	}
	want := []rbacv1.PolicyRule{requestRule(attrs)}
	if slices.Contains(u.GetGroups(), user.AllAuthenticated) {
		if ok, _ := validation.Covers(discoveryRules, want); ok {
			return authorizer.DecisionAllow, "RBAC: allowed by the discovery rules of every authenticated user", nil
		}
	}
	a.mu.RLock()
	defer a.mu.RUnlock()
	if !a.ready {
		return authorizer.DecisionNoOpinion, "RBAC: caches not synced yet", nil
	}
	var errs []string
	allowedBy := ""
	visit := func(source string, rules []rbacv1.PolicyRule) bool {
		if ok, _ := validation.Covers(rules, want); ok {
			allowedBy = source
			return false
		}
		return true
	}
	a.visitRules(u, attrs.GetNamespace(), visit, &errs)
	if allowedBy != "" {
		return authorizer.DecisionAllow, "RBAC: allowed by " + allowedBy, nil
	}
	reason := fmt.Sprintf("RBAC: no rule bound to %q allows %s", u.GetName(), describeRule(want[0]))
	if len(errs) > 0 {
		reason += " (" + strings.Join(errs, "; ") + ")"
	}
	return authorizer.DecisionNoOpinion, reason, nil
}

// visitRules calls visit with the rules of every Role and ClusterRole bound to
// u (cluster-wide, then in namespace) until visit returns false.
func (a *rbacAuthorizer) visitRules(u user.Info, namespace string, visit func(string, []rbacv1.PolicyRule) bool, errs *[]string) {
	clusterBindings, _ := a.clusterBindings.List(labels.Everything())
	for _, b := range clusterBindings {
		if !bound(u, b.Subjects, "") {
			continue
		}
		rules, err := a.roleRules(b.RoleRef, "")
		if err != nil {
			*errs = append(*errs, err.Error())
			continue
		}
		if !visit(fmt.Sprintf("ClusterRoleBinding %q of ClusterRole %q", b.Name, b.RoleRef.Name), rules) {
			return
		}
	}
	if namespace == "" {
		return
	}
	bindings, _ := a.roleBindings.RoleBindings(namespace).List(labels.Everything())
	for _, b := range bindings {
		if !bound(u, b.Subjects, namespace) {
			continue
		}
		rules, err := a.roleRules(b.RoleRef, namespace)
		if err != nil {
			*errs = append(*errs, err.Error())
			continue
		}
		if !visit(fmt.Sprintf("RoleBinding %q of %s %q in %s", b.Name, b.RoleRef.Kind, b.RoleRef.Name, namespace), rules) {
			return
		}
	}
}

func (a *rbacAuthorizer) roleRules(ref rbacv1.RoleRef, namespace string) ([]rbacv1.PolicyRule, error) {
	switch ref.Kind {
	case "Role":
		role, err := a.roles.Roles(namespace).Get(ref.Name)
		if err != nil {
			return nil, err
		}
		return role.Rules, nil
	case "ClusterRole":
		role, err := a.clusterRoles.Get(ref.Name)
		if err != nil {
			return nil, err
		}
		return role.Rules, nil
	}
	return nil, fmt.Errorf("unknown roleRef kind %q", ref.Kind)
}

// bound: one of the subjects is the user, one of its groups, or its service
// account (a ServiceAccount subject without a namespace means the binding's).
func bound(u user.Info, subjects []rbacv1.Subject, bindingNamespace string) bool {
	for _, s := range subjects {
		switch s.Kind {
		case rbacv1.UserKind:
			if s.Name == u.GetName() {
				return true
			}
		case rbacv1.GroupKind:
			if slices.Contains(u.GetGroups(), s.Name) {
				return true
			}
		case rbacv1.ServiceAccountKind:
			ns := s.Namespace
			if ns == "" {
				ns = bindingNamespace
			}
			if ns != "" && serviceaccount.MatchesUsername(ns, s.Name, u.GetName()) {
				return true
			}
		}
	}
	return false
}
